"""The Celery app the workers run: dagster-celery's step task, on the pipeline's broker, with the
same transport options as the executor that submits the steps.

    celery -A lumikb_pipeline.orchestration.celery_app worker -Q document_processing -c 2 \
        --max-memory-per-child 1500000 --max-tasks-per-child 200 -n document_processing@%h

One worker (process group) per queue; see docs/operations.md. The definitions and the processing
code are imported here, in the parent, so every forked worker process starts warm.
"""

import logging
import threading
import time
from typing import Any

from celery.signals import task_postrun, task_prerun
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from lumikb_pipeline.core import scrub
from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.infra.celery_config import worker_app_args
from lumikb_pipeline.infra.lost_steps import StepHeartbeats
from lumikb_pipeline.infra.run_retention import PRUNE_INTERVAL_S, prune_run_storage

scrub.install()  # before Celery logs anything (the broker URL in its banner, task errors)
app = make_app(worker_app_args(get_settings()))
execute_plan = create_task(app)

# Each step beats while it runs, so a step whose whole worker died is found and delivered again
# (`infra.lost_steps`) instead of waiting for the broker's visibility timeout.
_heartbeats = StepHeartbeats(get_settings())


@task_prerun.connect
def _step_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _heartbeats.started(task_id)


@task_postrun.connect
def _step_ended(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _heartbeats.ended(task_id)


def _preload() -> None:
    import lumikb_pipeline.definitions  # noqa: F401
    import lumikb_pipeline.pipeline.extract  # noqa: F401  (LiteLLM: not loaded by the definitions)


_preload()


_log = logging.getLogger(__name__)
_last_prune = time.monotonic()  # not at start: the first prune comes PRUNE_INTERVAL_S after it
_prune_lock = threading.Lock()


@task_postrun.connect
def _prune_this_machines_run_folders(**_: object) -> None:
    """The compute logs of the steps this worker ran are on its own machine (`DAGSTER_HOME/storage`,
    which need not be shared): they follow the run retention rule here, at most every
    `PRUNE_INTERVAL_S`, as the daemon's job-status sensor does for its own machine."""
    global _last_prune
    with _prune_lock:
        if time.monotonic() - _last_prune < PRUNE_INTERVAL_S:
            return
        _last_prune = time.monotonic()
    from dagster import DagsterInstance

    try:
        with DagsterInstance.get() as instance:
            deleted = prune_run_storage(instance)
    except Exception as exc:  # noqa: BLE001 - housekeeping never fails a task; tried again later
        _log.warning("could not prune this machine's old run folders: %s", exc)
        return
    if deleted:
        _log.info("deleted the compute logs of %d old run(s) on this machine", deleted)
