"""The Celery executor of our jobs: dagster-celery's, with one queue per job and one behaviour added.

The added behaviour: a step runs as soon as the outputs it needs exist, even if the step that made
them failed afterwards (Dagster's `require_upstream_step_success: false`, which dagster-celery's
execution loop does not pass through). `document_entities` relies on it: its extract op yields the
documents it extracted and then fails for the ones it could not, so the write op still writes and
materializes the good ones, the run fails for the bad ones only, and a retry from failure re-runs
extract (the ledger skips what is done) and write.

The broker is the pipeline's (`CELERY_BROKER_URL`, else `LUMIKB_REDIS_URL`, else the embedded
Redis), resolved when a run starts, so the definitions load without touching Redis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


class LumikbCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor, starting steps as soon as their inputs exist, with a run heartbeat
    (`run_watchdog`)."""

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return RUN_WHEN_INPUTS_EXIST

    def execute(self, plan_context: Any, execution_plan: ExecutionPlan) -> Iterator[Any]:
        from dagster_celery.core_execution_loop import core_celery_execution_loop
        from dagster_celery.executor import _submit_task

        from lumikb_pipeline.infra.run_watchdog import with_run_heartbeat

        plan = _PlanWithDependencyConfig(**execution_plan._asdict())
        # The run's heartbeat: the job-status sensor fails the run if this process dies.
        events = core_celery_execution_loop(plan_context, plan, step_execution_fn=_submit_task)
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
