"""The Celery app the workers run: dagster-celery's step task, on the pipeline's broker, with the
same transport options as the executor that submits the steps.

    celery -A lumikb_pipeline.orchestration.celery_app worker -Q document_processing -c 2 \
        --max-memory-per-child 1500000 --max-tasks-per-child 200 -n document_processing@%h

One worker (process group) per queue; see docs/operations.md. The definitions and the processing
code are imported here, in the parent, so every forked worker process starts warm.
"""

from typing import Any

from celery.signals import task_postrun, task_prerun
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from lumikb_pipeline.core import scrub
from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.infra.celery_config import worker_app_args
from lumikb_pipeline.infra.lost_steps import StepHeartbeats

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
    import lumikb_pipeline.pipeline  # noqa: F401


_preload()
