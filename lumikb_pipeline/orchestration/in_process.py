"""Running `document_entities` for some documents inside this process (the demo, tests, debugging).

The same job code as production: the runs are ordinary Dagster runs of `document_processing_job` or
`reextraction_job` (one per batch of consecutive partitions, recorded in the instance), executed by
the in-process executor with the same step dependency rule as the Celery one, instead of Celery.
They carry the repository label the Dagster UI scopes runs by, so the job pages and the timeline
show them, and, given a backfill id, that backfill's tag (see `record_in_process_backfill`).
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    DagsterInstance,
    Executor,
    InitExecutorContext,
    JobDefinition,
    execute_job,
    executor,
    reconstructable,
)
from dagster._core.execution.retries import RetryMode
from dagster._core.execution.step_dependency_config import StepDependencyConfig
from dagster._core.executor.in_process import InProcessExecutor
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import (
    DOCUMENT_PROCESSING_JOB,
    DOCUMENTS_PARTITIONS,
    GRAPH_INVARIANTS_JOB,
    REEXTRACTION_JOB,
    REPOSITORY_LABEL,
    TAG_BACKFILL,
    TAG_JOB_ID,
    TAG_MODE,
    TAG_REPOSITORY_LABEL,
    TAG_SCHEMA_VERSION,
)
from lumikb_pipeline.db.partition_keys import partition_keys_of
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.batching import PartitionBatch, contiguous_batches
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.infra.dagster_instance import add_missing_partitions, open_instance


@dataclass(frozen=True)
class InProcessRun:
    """One batch run: its Dagster run id, its documents (ids) and their partitions (keys), and
    whether every document succeeded."""

    run_id: str
    doc_ids: tuple[str, ...]
    success: bool
    partition_keys: tuple[str, ...] = ()


class _HeartbeatInProcessExecutor(InProcessExecutor):
    """Dagster's in-process executor with the run heartbeat of `infra.run_watchdog` (a killed demo's
    runs are failed and their slots freed by the job-status sensor's watchdog)."""

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        from lumikb_pipeline.infra.run_watchdog import with_run_heartbeat

        return with_run_heartbeat(plan_context, super().execute(plan_context, execution_plan))


@executor(name="in_process_lumikb")
def _in_process_lumikb_executor(_init_context: InitExecutorContext) -> Executor:
    return _HeartbeatInProcessExecutor(
        retries=RetryMode.ENABLED, step_dependency_config=StepDependencyConfig(require_upstream_step_success=False)
    )


def _with_in_process_executor(job_name: str) -> JobDefinition:
    from lumikb_pipeline.definitions import defs

    return defs.resolve_job_def(job_name).with_executor_def(_in_process_lumikb_executor)


def in_process_job() -> JobDefinition:
    """The re-extraction job with the in-process executor (module level: `reconstructable` needs it)."""
    return _with_in_process_executor(REEXTRACTION_JOB)


def in_process_document_processing_job() -> JobDefinition:
    """The normal-processing job with the in-process executor."""
    return _with_in_process_executor(DOCUMENT_PROCESSING_JOB)


def in_process_graph_invariants_job() -> JobDefinition:
    """The graph invariant checks' job with the in-process executor."""
    return _with_in_process_executor(GRAPH_INVARIANTS_JOB)


_IN_PROCESS_JOBS: dict[str, Callable[[], JobDefinition]] = {
    REEXTRACTION_JOB: in_process_job,
    DOCUMENT_PROCESSING_JOB: in_process_document_processing_job,
}


def run_graph_checks_in_process(instance: DagsterInstance, tags: dict[str, str] | None = None) -> dict[str, bool]:
    """Run `graph_invariants_job` (the invariant checks of `knowledge_graph`) here and now, as a
    Dagster run the UI shows under its job and on the checks' tabs; returns {check name: passed}."""
    run_tags = {**(tags or {}), TAG_REPOSITORY_LABEL: REPOSITORY_LABEL}
    run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with execute_job(
        reconstructable(in_process_graph_invariants_job), instance, run_config=run_config, tags=run_tags,
        raise_on_error=False,
    ) as result:
        return {
            evaluation.check_name: evaluation.passed
            for evaluation in result.get_asset_check_evaluations()
        }


def run_documents_in_process(
    settings: Settings,
    doc_ids: Sequence[str],
    *,
    instance: DagsterInstance | None = None,
    mode: WriteMode = WriteMode.REPLACE,
    job_id: str | None = None,
    schema_version: int | None = None,
    batch_size: int | None = None,
    on_batch: Callable[[InProcessRun], None] | None = None,
    job_name: str = REEXTRACTION_JOB,
    backfill_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> list[InProcessRun]:
    """Materialize `document_entities` for `doc_ids` here and now, batch by batch, as runs of
    `job_name` (`reextraction_job` or `document_processing_job`).

    Partitions (the documents' partition keys) are added when missing; ids of no document are left
    out. Tags are those of a re-extraction job (`job_id`, `mode`, `schema_version`; None: no job,
    replace, the KB's current version), plus `tags`, the repository label and the `backfill_id`'s tag.
    Failed documents are in the ledger; a batch with one is `success=False`. `on_batch` is called after
    each batch.
    """
    instance = instance or open_instance(settings)
    with session_scope(settings.effective_database_url) as session:
        key_of = partition_keys_of(session, doc_ids)
    doc_of = {key: doc_id for doc_id, key in key_of.items()}
    keys = [key_of[doc_id] for doc_id in doc_ids if doc_id in key_of]
    add_missing_partitions(instance, keys)
    order = instance.get_dynamic_partitions(DOCUMENTS_PARTITIONS)
    batches = contiguous_batches(order, set(keys), batch_size or settings.reextract_batch_size)
    tags = {**(tags or {}), TAG_MODE: WriteMode(mode).value, TAG_REPOSITORY_LABEL: REPOSITORY_LABEL}
    if backfill_id:
        tags[TAG_BACKFILL] = backfill_id
    if job_id:
        tags[TAG_JOB_ID] = job_id
    if schema_version is not None:
        tags[TAG_SCHEMA_VERSION] = str(schema_version)
    results = []
    for batch in batches:
        result = _run_batch(instance, batch, doc_of, tags, _IN_PROCESS_JOBS[job_name])
        results.append(result)
        if on_batch is not None:
            on_batch(result)
    return results


def _run_batch(
    instance: DagsterInstance, batch: PartitionBatch, doc_of: dict[str, str], tags: dict[str, Any],
    job: Callable[[], JobDefinition],
) -> InProcessRun:
    run_tags = {**tags, ASSET_PARTITION_RANGE_START_TAG: batch.first, ASSET_PARTITION_RANGE_END_TAG: batch.last}
    # The runs' events are all in the instance (and the UI); only warnings need to reach the console.
    run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    with execute_job(
        reconstructable(job), instance, run_config=run_config, tags=run_tags, raise_on_error=False
    ) as result:
        return InProcessRun(result.run_id, tuple(doc_of[key] for key in batch.keys), result.success, batch.keys)
