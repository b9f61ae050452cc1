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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lumikb_pipeline import progress, redis_client
from lumikb_pipeline.catalog import get_kb
from lumikb_pipeline.config import Settings
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.models import Document, Job, JobMode, JobStatus, JobTrigger, KnowledgeBase, utcnow
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.errors import NotFoundError, UsageError
from lumikb_pipeline.orchestration.names import (
    DOCUMENTS_PARTITIONS,
    TAG_BACKFILL,
    TAG_JOB_ID,
    TAG_KB,
    TAG_MODE,
    TAG_SCHEMA_VERSION,
    TAG_TRIGGER,
)
from lumikb_pipeline.orchestration.tags import reextraction_tags
from lumikb_pipeline.progress.tracker import ProgressTracker

if TYPE_CHECKING:
    from dagster import DagsterInstance

SelectionKind = Literal["outdated", "all", "ids"]
CLAIMANT_PREFIX = "dagster-run:"  # ledger claimant of a run of `document_entities`: + the root run id
ROOT_RUN_TAG = "dagster/root_run_id"
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
    found = set(session.scalars(live.where(Document.id.in_(selection.ids))))
    missing = [doc_id for doc_id in selection.ids if doc_id not in found]
    if missing:
        raise NotFoundError(
            f"document(s) {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} are not live documents of KB "
            f"{kb.slug}; list them with `lumikb kb list` and check the ids"
        )
    return [doc_id for doc_id in session.scalars(live) if doc_id in found]


def start_reextraction(
    settings: Settings,
    kb_slug: str,
    selection: Selection,
    mode: str = "replace",
    trigger: JobTrigger | str = JobTrigger.CLI,
    max_cost: float | None = None,
    *,
    dedupe_key: str | None = None,
    instance: DagsterInstance | None = None,
    launch: bool = True,
    backfill_id: str | None = None,
) -> Job:
    """Start a re-extraction job of `kb_slug`'s selected documents on the `reprocessing` queue.

    Records the `Job` (target: the KB's current schema version) and its ledger rows, makes sure
    every document has its partition, and launches one Dagster backfill over exactly those
    partitions, tagged `lumikb/job_id`, `lumikb/mode`, `lumikb/schema_version`. With `dedupe_key`
    (unique), a second call with the same key returns the first job and launches nothing.
    A selection with no documents gives a job that is `succeeded` at once. `launch=False` records
    the job without launching anything (the demo runs its documents in-process). `backfill_id` records
    the job of a backfill that already exists (one launched in the Dagster UI) and launches nothing.
    """
    if mode not in (JobMode.REPLACE.value, JobMode.MERGE.value):
        raise UsageError(f"mode {mode!r} is not one of replace, merge")
    if max_cost is not None and max_cost < 0:
        raise UsageError(f"--max-cost {max_cost} is negative; give a budget in USD of 0 or more")
    trigger = JobTrigger(trigger)
    with session_scope(settings.effective_database_url) as session:
        if dedupe_key is not None:
            existing = session.scalar(select(Job).where(Job.dedupe_key == dedupe_key))
            if existing is not None:
                return existing
        kb = get_kb(session, kb_slug)
        doc_ids = select_documents(session, kb, selection)
        now = utcnow()
        job = Job(
            kb_id=kb.id, target_schema_version=kb.current_schema_version, mode=JobMode(mode),
            selection=selection.to_json(), trigger=trigger, status=JobStatus.PENDING, dedupe_key=dedupe_key,
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
        launch_job(settings, job, doc_ids, kb_slug=kb_slug, instance=instance)
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
    }


def launch_job(
    settings: Settings,
    job: Job,
    doc_ids: Sequence[str],
    *,
    kb_slug: str,
    instance: DagsterInstance | None = None,
) -> str:
    """Add the partitions and the backfill of a recorded job (idempotent); returns the backfill id."""
    from dagster._core.execution.backfill import PartitionBackfill

    from lumikb_pipeline.assets.document_entities import DOCUMENT_ENTITIES
    from lumikb_pipeline.orchestration.instance import open_instance

    instance = instance or open_instance(settings)
    backfill_id = backfill_id_for(job.id)
    if instance.get_backfill(backfill_id) is None:
        existing = instance.get_existing_dynamic_partitions(DOCUMENTS_PARTITIONS, list(doc_ids))
        missing = [doc_id for doc_id in doc_ids if doc_id not in existing]
        if missing:
            instance.add_dynamic_partitions(DOCUMENTS_PARTITIONS, missing)
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=_asset_graph(),
            partition_names=list(doc_ids),
            asset_selection=[DOCUMENT_ENTITIES],
            backfill_timestamp=time.time(),
            tags=_job_tags(job, kb_slug),
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=f"re-extract {kb_slug} to schema v{job.target_schema_version} ({job.mode.value})",
            description=f"lumikb job {job.id}: {len(doc_ids)} document(s), trigger {job.trigger.value}",
            run_config=None,
        )
        instance.add_backfill(backfill)
    with session_scope(settings.effective_database_url) as session:
        row = session.get_one(Job, job.id)
        row.dagster_backfill_id = backfill_id
        if row.status == JobStatus.PENDING:
            row.status = JobStatus.RUNNING
            row.started_at = row.started_at or utcnow()
        row.updated_at = utcnow()
    job.dagster_backfill_id = backfill_id
    job.status = JobStatus.RUNNING
    return backfill_id


def backfill_documents(backfill: Any) -> list[str]:
    """The `document_entities` partitions (document ids) a Dagster backfill targets: an asset backfill's
    partitions of that asset, or a job backfill's partitions (`reextraction_job` from its job page);
    [] for a backfill of anything else."""
    from lumikb_pipeline.assets.document_entities import DOCUMENT_ENTITIES
    from lumikb_pipeline.orchestration.names import REEXTRACTION_JOB

    data = backfill.asset_backfill_data
    if data is None:
        return sorted(backfill.partition_names or []) if backfill.job_name == REEXTRACTION_JOB else []
    subset = data.target_subset.partitions_subsets_by_asset_key.get(DOCUMENT_ENTITIES)
    return sorted(subset.get_partition_keys()) if subset is not None else []


def ui_backfill_jobs(
    settings: Settings, instance: DagsterInstance, backfill_id: str, doc_ids: Sequence[str]
) -> dict[str, str]:
    """{document id: job id} for `doc_ids` of a backfill of `document_entities` launched outside
    lumikb (the Dagster UI). The backfill's jobs are recorded first if one of these documents' KBs
    has none yet (`record_backfill_jobs`); otherwise this is one small query, as each run of the
    backfill asks it twice. Documents that are not live documents are left out.
    """
    with session_scope(settings.effective_database_url) as session:
        jobs = {job.kb_id: job.id for job in session.scalars(select(Job).where(Job.dagster_backfill_id == backfill_id))}
        kb_of = dict(
            session.execute(
                select(Document.id, Document.kb_id).where(Document.id.in_(doc_ids), Document.deleted_at.is_(None))
            ).tuples().all()
        )
    if not set(kb_of.values()) <= jobs.keys():
        jobs = record_backfill_jobs(settings, instance, backfill_id)
    return {doc_id: jobs[kb_id] for doc_id, kb_id in kb_of.items() if kb_id in jobs}


def record_backfill_jobs(settings: Settings, instance: DagsterInstance, backfill_id: str) -> dict[int, str]:
    """Record the jobs of a backfill of `document_entities` launched outside lumikb (idempotent), one
    per KB of its live documents (trigger `ui-backfill`, target the KB's current schema version, mode
    from the backfill's `lumikb/mode` tag, default replace); returns {KB id: job id}, empty for a
    backfill lumikb launched itself."""
    backfill = instance.get_backfill(backfill_id)
    if backfill is None or backfill.tags.get(TAG_JOB_ID):
        return {}
    with session_scope(settings.effective_database_url) as session:
        jobs = {job.kb_id: job.id for job in session.scalars(select(Job).where(Job.dagster_backfill_id == backfill_id))}
        rows = session.execute(
            select(Document.id, KnowledgeBase.id, KnowledgeBase.slug)
            .join(KnowledgeBase, KnowledgeBase.id == Document.kb_id)
            .where(Document.id.in_(backfill_documents(backfill)), Document.deleted_at.is_(None))
        ).tuples()
        by_kb: dict[tuple[int, str], list[str]] = {}
        for doc_id, kb_id, slug in rows:
            by_kb.setdefault((kb_id, slug), []).append(doc_id)
    for (kb_id, slug), docs in by_kb.items():
        if kb_id not in jobs:
            jobs[kb_id] = start_reextraction(
                settings, slug, Selection.of_ids(docs), backfill.tags.get(TAG_MODE, JobMode.REPLACE.value),
                JobTrigger.UI_BACKFILL, dedupe_key=f"ui-backfill:{backfill_id}:{slug}", backfill_id=backfill_id,
            ).id
    return jobs


def record_ui_backfills(settings: Settings, instance: DagsterInstance) -> list[str]:
    """Record the jobs of every requested backfill of `document_entities` that lumikb did not launch
    and has no job yet; returns those backfills' ids."""
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    recorded = []
    for backfill in instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])):
        if backfill.tags.get(TAG_JOB_ID) or not backfill_documents(backfill):
            continue
        with session_scope(settings.effective_database_url) as session:
            known = session.scalar(select(Job.id).where(Job.dagster_backfill_id == backfill.backfill_id).limit(1))
        if known is None and record_backfill_jobs(settings, instance, backfill.backfill_id):
            recorded.append(backfill.backfill_id)
    return recorded


def _asset_graph() -> Any:
    from lumikb_pipeline.definitions import defs

    return defs.resolve_asset_graph()


def job_documents(session: Session, job: Job) -> list[str]:
    """The documents a job covers: its ledger rows, in ingestion order."""
    from lumikb_pipeline.db.models import ExtractionRecord

    return list(
        session.scalars(
            select(ExtractionRecord.document_id)
            .join(Document, Document.id == ExtractionRecord.document_id)
            .where(ExtractionRecord.job_id == job.id, ExtractionRecord.schema_version == job.target_schema_version)
            .order_by(Document.created_at, Document.id)
        )
    )


def refresh_job_status(settings: Settings, job_id: str, instance: DagsterInstance) -> Job:
    """Bring a job's status, run ids and times in line with its Dagster backfill; returns the job.

    A job whose launch was interrupted (recorded, no backfill yet) is launched now.
    """
    from dagster import RunsFilter
    from dagster._core.execution.backfill import BulkActionStatus

    with session_scope(settings.effective_database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist; `lumikb reextract` prints the ids of the jobs it starts")
        if job.status in TERMINAL:
            session.expunge(job)
            return job
        kb_slug = session.get_one(KnowledgeBase, job.kb_id).slug
        doc_ids = job_documents(session, job)
        backfill_id = job.dagster_backfill_id or backfill_id_for(job.id)
    backfill = instance.get_backfill(backfill_id)
    if backfill is None:
        launch_job(settings, job, doc_ids, kb_slug=kb_slug, instance=instance)
        return job
    run_ids = list(instance.get_run_ids(RunsFilter(tags={TAG_BACKFILL: backfill_id})))
    status = {
        BulkActionStatus.COMPLETED_SUCCESS: JobStatus.SUCCEEDED,
        BulkActionStatus.COMPLETED: JobStatus.SUCCEEDED,
        BulkActionStatus.COMPLETED_FAILED: JobStatus.FAILED,
        BulkActionStatus.FAILED: JobStatus.FAILED,
        BulkActionStatus.CANCELED: JobStatus.CANCELLED,
    }.get(backfill.status, JobStatus.RUNNING)
    with session_scope(settings.effective_database_url) as session:
        row = session.get_one(Job, job_id, with_for_update=True)
        row.dagster_backfill_id = backfill_id
        row.dagster_run_ids = sorted(set(row.dagster_run_ids or []) | set(run_ids))
        # The workers close a job when its last document ends, usually before Dagster marks the
        # backfill completed: a job that ended since the first read above is never reopened.
        if row.status != status and row.status not in TERMINAL:
            row.status = status
            row.updated_at = utcnow()
            if status in TERMINAL:
                row.finished_at = utcnow()
                counts = ledger.status_counts(session, job_id)
                failed = counts.get(ledger.ExtractionStatus.FAILED, 0)
                if failed:
                    row.error = (
                        f"{failed} document(s) failed; see `lumikb progress {job_id}` and the backfill {backfill_id}"
                    )
        session.flush()
        session.expunge(row)
        return row


# How long after the last run of a run group ended its claims count as abandoned: the run-retry
# daemon launches a retry (which takes the claims over) within a few seconds of a failure.
RUN_RETRY_GRACE_S = 60.0


def dagster_claimant_gone(instance: DagsterInstance, now: float | None = None) -> Callable[[str], bool | None]:
    """Whether the claimant of a ledger row is gone, for `ledger.reap_abandoned`: a claimant
    `dagster-run:ROOT` is gone once every run of that run group (the run and its retries) has
    finished more than `RUN_RETRY_GRACE_S` ago; other claimants are unknown (None)."""
    from dagster import RunsFilter

    def gone(claimant: str) -> bool | None:
        if not claimant.startswith(CLAIMANT_PREFIX):
            return None
        root = claimant.removeprefix(CLAIMANT_PREFIX)
        records = [
            *instance.get_run_records(RunsFilter(run_ids=[root])),
            *instance.get_run_records(RunsFilter(tags={ROOT_RUN_TAG: root})),
        ]
        if not records:
            return True
        if any(not record.dagster_run.is_finished for record in records):
            return False
        last = max((record.end_time or record.update_timestamp.timestamp()) for record in records)
        return (now if now is not None else time.time()) - last > RUN_RETRY_GRACE_S

    return gone


def reap_abandoned_work(settings: Settings, instance: DagsterInstance) -> list[str]:
    """Close the ledger rows whose claimant is gone (`ledger.reap_abandoned`, with the Dagster run
    groups as claimants), report them to their jobs' progress and close the jobs they finish.
    Returns one line per job touched."""
    with session_scope(settings.effective_database_url) as session:
        reaped = ledger.reap_abandoned(session, dagster_claimant_gone(instance))
        by_job: dict[str, list[tuple[str, str, float, str | None]]] = {}
        for row in reaped:
            if row.job_id is not None:
                by_job.setdefault(row.job_id, []).append((row.document_id, "failed", row.cost_usd, row.last_error))
    lines = []
    for job_id, outcomes in by_job.items():
        progress.report(redis_client.connect(settings), job_id, outcomes)
        with session_scope(settings.effective_database_url) as session:
            closed = ledger.finish_job_if_done(session, job_id)
        lines.append(
            f"job {job_id}: {len(outcomes)} abandoned document(s) marked failed"
            + (f", job {closed.value}" if closed is not None else "")
        )
    if reaped and not by_job:
        lines.append(f"{len(reaped)} abandoned document(s) of no job marked failed")
    return lines
