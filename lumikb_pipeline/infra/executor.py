"""The Celery executor of our jobs: dagster-celery's, with one queue per job and two behaviours added.

The first: a step runs as soon as the outputs it needs exist, even if the step that made
them failed afterwards (Dagster's `require_upstream_step_success: false`, which dagster-celery's
execution loop does not pass through). `document_entities` relies on it: its extract op yields the
documents it extracted and then fails for the ones it could not, so the write op still writes and
materializes the good ones, the run fails for the bad ones only, and a retry from failure re-runs
extract (the ledger skips what is done) and write.

The second: a step the broker lost is submitted again. dagster-celery's loop waits on each step's
Celery result; when Redis loses its data (restarted without persistence) a queued step's message
and a finished step's result are gone, and the run would wait until its max runtime. Each submitted
step is watched (`_WatchedStep`): once `lost_steps.step_gone_from_broker` has held for
`GONE_AFTER_S` it is submitted again, with a warning in the run's event log. The ledger and the
chunk checkpoints make the second execution safe (no document written twice, no chunk paid twice).
While Redis does not answer, a step counts as not ready yet instead of failing the run.

The broker is the pipeline's (`CELERY_BROKER_URL`, else `LUMIKB_REDIS_URL`, else the embedded
Redis), resolved when a run starts, so the definitions load without touching Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from dagster import Executor, ExecutorDefinition, InitExecutorContext, executor, multiple_process_executor_requirements
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode
from dagster._core.execution.step_dependency_config import StepDependencyConfig
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor

from lumikb_pipeline.core.names import Queue

# Run a step once its inputs exist, whatever happened to the step that produced them afterwards.
RUN_WHEN_INPUTS_EXIST = StepDependencyConfig(require_upstream_step_success=False)


class _PlanWithDependencyConfig(ExecutionPlan):
    """The same plan; `start` passes our step dependency config (dagster-celery passes none)."""

    _dependency_config: StepDependencyConfig = RUN_WHEN_INPUTS_EXIST

    def start(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("step_dependency_config", RUN_WHEN_INPUTS_EXIST)
        return super().start(*args, **kwargs)


class _WatchedStep:
    """A submitted step's Celery result for dagster-celery's loop (`ready`, `get`, `revoke`),
    submitted again when the broker has lost it."""

    def __init__(self, submit: Callable[[], Any], queue: str, step_key: str, log: Any,
                 gone_after_s: float | None = None, check_interval_s: float | None = None) -> None:
        from lumikb_pipeline.core.config import get_settings
        from lumikb_pipeline.infra.lost_steps import GONE_AFTER_S, GONE_CHECK_INTERVAL_S

        self._gone_after_s = GONE_AFTER_S if gone_after_s is None else gone_after_s
        self._check_interval_s = GONE_CHECK_INTERVAL_S if check_interval_s is None else check_interval_s
        self._submit = submit
        self._queue = queue
        self._step_key = step_key
        self._log = log
        self._settings = get_settings()
        self.result = submit()
        self._gone_since: float | None = None
        self._next_check = time.monotonic()

    def ready(self) -> bool:
        from lumikb_pipeline.infra.lost_steps import step_gone_from_broker

        try:
            if self.result.ready():
                return True
        except Exception:  # noqa: BLE001 - the result backend away: asked again at the next tick
            return False
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self._check_interval_s
        try:
            gone = step_gone_from_broker(self._settings, self.result.id, self._queue)
        except Exception:  # noqa: BLE001 - Redis away: the step's state is unknown, not lost
            gone = False
        if not gone:
            self._gone_since = None
        elif self._gone_since is None:
            self._gone_since = now
        elif now - self._gone_since >= self._gone_after_s:
            self._submit_again(now - self._gone_since)
        return False

    def _submit_again(self, silent_s: float) -> None:
        lost = self.result.id
        try:
            self.result = self._submit()
        except Exception:  # noqa: BLE001 - the broker away again: tried at the next check
            return
        self._gone_since = None
        self._log.warning(
            f'step "{self._step_key}": its Celery task {lost} is gone from the broker (for {silent_s:.0f} s no '
            f"result, no heartbeat, not queued, not held by a worker: Redis lost its data?); submitted again "
            f"as task {self.result.id}"
        )

    def get(self) -> Any:
        return self.result.get()

    def revoke(self) -> Any:
        return self.result.revoke()


def _submit_watched(
    app: Any, plan_context: Any, step: Any, queue: str, priority: int, known_state: Any
) -> _WatchedStep:
    """dagster-celery's `_submit_task`, watched (`_WatchedStep`)."""
    from dagster_celery.executor import _submit_task

    return _WatchedStep(lambda: _submit_task(app, plan_context, step, queue, priority, known_state),
                        queue, step.key, plan_context.log)


class LumikbCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor, starting steps as soon as their inputs exist, submitting again the
    steps the broker lost, with a run heartbeat (`run_watchdog`)."""

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return RUN_WHEN_INPUTS_EXIST

    def execute(self, plan_context: Any, execution_plan: ExecutionPlan) -> Iterator[Any]:
        from dagster_celery.core_execution_loop import core_celery_execution_loop

        from lumikb_pipeline.infra.run_watchdog import with_run_heartbeat

        plan = _PlanWithDependencyConfig(**execution_plan._asdict())
        # The run's heartbeat: the job-status sensor fails the run if this process dies.
        events = core_celery_execution_loop(plan_context, plan, step_execution_fn=_submit_watched)
        return with_run_heartbeat(plan_context, events)


@executor(
    name="lumikb_celery",
    config_schema=CELERY_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def lumikb_celery_executor(init_context: InitExecutorContext) -> Executor:
    """Celery on the pipeline's broker; `config_source.task_default_queue` picks the queue."""
    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.infra.redis_client import broker_url

    config = init_context.executor_config
    url = config.get("broker") or broker_url(get_settings())
    return LumikbCeleryExecutor(
        broker=url,
        backend=config.get("backend") if config.get("backend") not in (None, "rpc://") else url,
        config_source=config.get("config_source"),
        include=config.get("include"),
        retries=RetryMode.from_config(cast(Mapping[str, Mapping[Any, Any]], config["retries"])),
    )


def celery_executor_for(queue: Queue) -> ExecutorDefinition:
    """The executor that sends every step of a run to `queue`."""
    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.infra.celery_config import celery_config_source

    return lumikb_celery_executor.configured(
        {"config_source": celery_config_source(get_settings(), queue)},
        name=f"celery_{queue}",
    )
