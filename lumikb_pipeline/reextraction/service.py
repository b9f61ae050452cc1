"""Re-extraction jobs: choosing the documents, recording the `Job`, launching the Dagster work.

`start_reextraction` is the one entry point (the CLI, the schema-version sensor and anything else
call it). A job is launched as one Dagster backfill of `document_entities` over exactly its
documents' partitions, on the `reprocessing` queue; Dagster batches it into runs with the asset's
backfill policy (`LUMIKB_REEXTRACT_BATCH_SIZE` documents per run, consecutive partitions only) and
shows each document's own outcome. The backfill id is derived from the job id, so launching is
idempotent: a launch that was interrupted is completed by the job-status sensor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dagster import AssetKey
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.errors import NotFoundError, UsageError
from lumikb_pipeline.core.names import (
    DOCUMENT_ENTITIES_ASSET,
    TAG_JOB_ID,
    TAG_KB,
    TAG_MODE,
    TAG_SCHEMA_VERSION,
    TAG_STRATEGY,
    TAG_TRIGGER,
)
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.catalog import get_kb
from lumikb_pipeline.db.models import Document, Job, JobStatus, JobTrigger, KnowledgeBase, utcnow
from lumikb_pipeline.db.paging import one_of, pages
from lumikb_pipeline.db.partition_keys import partition_keys_of
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.budget import check_max_cost
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.infra.dagster_instance import add_missing_partitions, open_instance
from lumikb_pipeline.infra.tags import reextraction_tags
from lumikb_pipeline.pipeline.migration import STRATEGY_OPTIONS, StrategyOption
from lumikb_pipeline.tracking.tracker import ProgressTracker

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

SelectionKind = Literal["outdated", "all", "ids"]
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class Selection:
    """Which documents of a KB a job re-extracts."""

    kind: SelectionKind
    ids: tuple[str, ...] = ()

    @classmethod
    def outdated(cls) -> Selection:
        return cls("outdated")

    @classmethod
    def all(cls) -> Selection:
        return cls("all")

    @classmethod
    def of_ids(cls, ids: Sequence[str]) -> Selection:
        if not ids:
            raise UsageError("no document ids given; pass --doc ID (repeatable), or use --outdated or --all")
        return cls("ids", tuple(dict.fromkeys(ids)))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "ids": list(self.ids)} if self.kind == "ids" else {"kind": self.kind}


def backfill_id_for(job_id: str) -> str:
    """The Dagster backfill id of a job (32 hex characters, the most Dagster stores)."""
    return job_id.replace("-", "")


def select_documents(session: Session, kb: KnowledgeBase, selection: Selection) -> list[str]:
    """The live documents of `kb` that `selection` names, in ingestion order."""
    if selection.kind == "outdated":
        return ledger.outdated_document_ids(session, kb)
    live = (
        select(Document.id)
        .where(Document.kb_id == kb.id, Document.deleted_at.is_(None))
        .order_by(Document.created_at, Document.id)
    )
    if selection.kind == "all":
        return list(session.scalars(live))
    # A document is named by its id or by its partition key (as the Dagster UI shows it).
    found_rows: list[tuple[str, str]] = []
    for page in pages(selection.ids):
        found_rows += session.execute(
            select(Document.id, Document.partition_key).where(
                Document.kb_id == kb.id, Document.deleted_at.is_(None),
                or_(one_of(session, Document.id, page), one_of(session, Document.partition_key, page)),
            )
        ).tuples().all()
    found = {doc_id for doc_id, _key in found_rows}
    named = {name for row in found_rows for name in row}
    missing = [name for name in selection.ids if name not in named]
    if missing:
        raise NotFoundError(
            f"document(s) {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} are not live documents of KB "
            f"{kb.slug}; check the ids (or partition keys, as the Dagster UI shows them)"
        )
    return [doc_id for doc_id in session.scalars(live) if doc_id in found]


def start_reextraction(
    settings: Settings,
    kb_slug: str,
    selection: Selection,
    mode: WriteMode | str = WriteMode.REPLACE,
    trigger: JobTrigger | str = JobTrigger.CLI,
    max_cost: float | None = None,
    *,
    dedupe_key: str | None = None,
    instance: DagsterInstance | None = None,
    asset_graph: BaseAssetGraph | None = None,
    launch: bool = True,
    backfill_id: str | None = None,
    strategy: str = "auto",
) -> Job:
    """Start a re-extraction job of `kb_slug`'s selected documents on the `reprocessing` queue.

    Records the `Job` (target: the KB's current schema version) and its ledger rows, makes sure
    every document has its partition, and launches one Dagster backfill over exactly those
    partitions, tagged `lumikb/job_id`, `lumikb/mode`, `lumikb/schema_version`. With `dedupe_key`
    (unique), a second call with the same key returns the first job and launches nothing.
    A selection with no documents gives a job that is `succeeded` at once. `launch=False` records
    the job without launching anything (the demo runs its documents in-process). `backfill_id` records
    the job of a backfill that already exists (one launched in the Dagster UI) and launches nothing.
    Launching needs the code location's `asset_graph` (a sensor's `context.repository_def.asset_graph`,
    the CLI's `defs.resolve_asset_graph()`). `strategy` is `auto` (each document the cheapest correct
    way from the version it was extracted at: `pipeline.migration`) or `full`; it is kept in the job's
    selection and its runs' tags.
    """
    if strategy not in STRATEGY_OPTIONS:
        raise UsageError(f"strategy {strategy!r} is not one of {', '.join(STRATEGY_OPTIONS)}")
    mode = WriteMode.parse(mode, "--mode")
    max_cost = check_max_cost(max_cost)
    trigger = JobTrigger(trigger)
    with session_scope(settings.effective_database_url) as session:
        if dedupe_key is not None:
            existing = session.scalar(select(Job).where(Job.dedupe_key == dedupe_key))
            if existing is not None:
                return existing
        kb = get_kb(session, kb_slug)
        doc_ids = select_documents(session, kb, selection)
        if held := ledger.documents_in_other_jobs(session, doc_ids, kb.current_schema_version):
            # Two jobs never share a ledger row: the second would take it and the first would wait forever.
            examples = ", ".join(f"{doc_id} (job {job_id})" for doc_id, job_id in list(held.items())[:3])
            jobs_ = sorted(set(held.values()))
            raise UsageError(
                f"{len(held)} of the {len(doc_ids)} selected document(s) of KB {kb_slug} are already in a job "
                f"that is still going: {examples}; wait for it to end (`lumikb progress {jobs_[0]}`) or cancel it "
                f"(`lumikb cancel {jobs_[0]}`), then start this job again"
            )
        now = utcnow()
        job = Job(
            kb_id=kb.id, target_schema_version=kb.current_schema_version, mode=mode,
            selection={**selection.to_json(), **({"strategy": strategy} if strategy != "auto" else {})},
            trigger=trigger, status=JobStatus.PENDING, dedupe_key=dedupe_key,
            total_documents=len(doc_ids), max_cost_usd=max_cost, created_at=now, updated_at=now,
            dagster_backfill_id=backfill_id,
        )
        session.add(job)
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            existing = session.scalar(select(Job).where(Job.dedupe_key == dedupe_key))
            if existing is None:
                raise
            return existing
        # Only `--outdated` leaves documents already done at this version alone: `--all` and `--doc` ask
        # for a fresh extraction (served from checkpoints where the chunks are unchanged).
        ledger.ensure_records(
            session, kb.id, doc_ids, kb.current_schema_version, job.id, redo_succeeded=selection.kind != "outdated"
        )
        if not doc_ids:
            job.status, job.started_at, job.finished_at = JobStatus.SUCCEEDED, now, now
        session.flush()
        session.expunge(job)
    ProgressTracker(redis_client.connect(settings)).start(job.id, len(doc_ids), job.created_at.timestamp())
    if doc_ids and launch and backfill_id is None:
        launch_job(settings, job, doc_ids, kb_slug=kb_slug, instance=instance, asset_graph=asset_graph)
    elif doc_ids:
        _mark_running(settings, job)
    return job


def _mark_running(settings: Settings, job: Job) -> None:
    with session_scope(settings.effective_database_url) as session:
        row = session.get_one(Job, job.id)
        row.status, row.started_at, row.updated_at = JobStatus.RUNNING, utcnow(), utcnow()
    job.status = JobStatus.RUNNING


def _job_tags(job: Job, kb_slug: str) -> dict[str, str]:
    return {
        **reextraction_tags(),
        TAG_JOB_ID: job.id,
        TAG_MODE: job.mode.value,
        TAG_SCHEMA_VERSION: str(job.target_schema_version),
        TAG_KB: kb_slug,
        TAG_TRIGGER: job.trigger.value,
        TAG_STRATEGY: job_strategy(job),
    }


def job_strategy(job: Job) -> StrategyOption:
    """The strategy option a job was started with (`auto` unless `full` was asked)."""
    return "full" if (job.selection or {}).get("strategy") == "full" else "auto"


def launch_job(
    settings: Settings,
    job: Job,
    doc_ids: Sequence[str],
    *,
    kb_slug: str,
    instance: DagsterInstance | None = None,
    asset_graph: BaseAssetGraph | None = None,
) -> str:
    """Add the partitions and the backfill of a recorded job (idempotent); returns the backfill id.

    Two processes may launch the same job: the one that recorded it, and the job-status sensor, which
    finishes a launch a crash interrupted. The job's row stays locked while it launches, and a second
    launcher that finds it locked returns at once, so only one adds the backfill (Dagster refuses a
    second one with its id). A launcher that dies releases the lock with its connection.
    """
    instance = instance or open_instance(settings)
    backfill_id = backfill_id_for(job.id)
    with session_scope(settings.effective_database_url) as session:
        row = session.scalar(select(Job).where(Job.id == job.id).with_for_update(skip_locked=True))
        if row is None:  # another process is launching it right now
            job.dagster_backfill_id = backfill_id
            return backfill_id
        if instance.get_backfill(backfill_id) is None:
            if asset_graph is None:
                raise ValueError("launching a re-extraction job needs the code location's asset graph")
            keys = _partition_keys(settings, doc_ids)
            add_missing_partitions(instance, keys)
            instance.add_backfill(_new_backfill(job, keys, kb_slug, instance, asset_graph))
        row.dagster_backfill_id = backfill_id
        if row.status == JobStatus.PENDING:
            row.status = JobStatus.RUNNING
            row.started_at = row.started_at or utcnow()
        row.updated_at = utcnow()
    job.dagster_backfill_id = backfill_id
    job.status = JobStatus.RUNNING
    return backfill_id


def _partition_keys(settings: Settings, doc_ids: Sequence[str]) -> list[str]:
    """The partition keys of these documents, in their order."""
    with session_scope(settings.effective_database_url) as session:
        keys = partition_keys_of(session, doc_ids)
    return [keys[doc_id] for doc_id in doc_ids if doc_id in keys]


def _new_backfill(
    job: Job, partition_keys: Sequence[str], kb_slug: str, instance: DagsterInstance, asset_graph: BaseAssetGraph
) -> Any:
    """The Dagster backfill of `document_entities` over a job's documents' partitions (status REQUESTED)."""
    from dagster._core.execution.backfill import PartitionBackfill

    return PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id_for(job.id),
        asset_graph=asset_graph,
        partition_names=list(partition_keys),
        asset_selection=[AssetKey(DOCUMENT_ENTITIES_ASSET)],
        backfill_timestamp=time.time(),
        tags=_job_tags(job, kb_slug),
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=f"re-extract {kb_slug} to schema v{job.target_schema_version} ({job.mode.value})",
        description=f"lumikb job {job.id}: {len(partition_keys)} document(s), trigger {job.trigger.value}",
        run_config=None,
    )


def in_process_backfill_tags(job: Job, kb_slug: str) -> dict[str, str]:
    """The tags of a job's runs executed in this process: those of the runs its backfill would launch."""
    return _job_tags(job, kb_slug)


def record_in_process_backfill(
    settings: Settings,
    instance: DagsterInstance,
    asset_graph: BaseAssetGraph,
    job: Job,
    doc_ids: Sequence[str],
    *,
    kb_slug: str,
    run_ids: Sequence[str],
    succeeded: Sequence[str],
    started_at: float,
) -> str:
    """Record, once its runs have run in this process (`run_documents_in_process` with the backfill
    id), the job's backfill as ended, so the Dagster UI's Backfills page lists it with its runs and
    outcome; no daemon ever launches anything for it. Returns the backfill id."""
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
    from dagster._core.definitions.events import AssetKeyPartitionKey
    from dagster._core.execution.backfill import BulkActionStatus

    key = AssetKey(DOCUMENT_ENTITIES_ASSET)

    def subset(keys: set[str]) -> AssetGraphSubset:
        return AssetGraphSubset.from_asset_partition_set(
            {AssetKeyPartitionKey(key, partition) for partition in keys}, asset_graph
        )

    with session_scope(settings.effective_database_url) as session:
        key_of = partition_keys_of(session, [*doc_ids, *succeeded])
    keys = [key_of[doc_id] for doc_id in doc_ids if doc_id in key_of]
    succeeded_keys = {key_of[doc_id] for doc_id in succeeded if doc_id in key_of}
    backfill = _new_backfill(job, keys, kb_slug, instance, asset_graph)
    data = backfill.asset_backfill_data
    done, failed = subset(succeeded_keys & set(keys)), subset(set(keys) - succeeded_keys)
    data = data._replace(
        requested_runs_for_target_roots=True, requested_subset=data.target_subset, materialized_subset=done,
        failed_and_downstream_subset=failed,
    )
    status = BulkActionStatus.COMPLETED_SUCCESS if succeeded_keys >= set(keys) else BulkActionStatus.COMPLETED_FAILED
    backfill = backfill._replace(backfill_timestamp=started_at).with_asset_backfill_data(
        data, dynamic_partitions_store=instance, asset_graph=asset_graph
    ).with_status(status).with_end_timestamp(time.time())
    instance.add_backfill(backfill)
    with session_scope(settings.effective_database_url) as session:
        row = session.get_one(Job, job.id)
        row.dagster_backfill_id = backfill.backfill_id
        row.dagster_run_ids = sorted(set(row.dagster_run_ids or []) | set(run_ids))
    job.dagster_backfill_id = backfill.backfill_id
    return str(backfill.backfill_id)
