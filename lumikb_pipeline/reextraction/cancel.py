"""`lumikb cancel JOB`: stop a job cleanly.

Order matters: first the flag (app database and Redis) that every worker reads before each LLM
call, so nothing new is sent once this returns; then the job's documents not yet started are
marked `cancelled`; then the Dagster side: the backfill stops launching runs and queued runs are
cancelled. Runs already going are not killed — killing a step mid-write is what would leave a
half-written document — they see the flag within a second, finish the document they are writing
(one transaction) or keep its previous graph and mark it `cancelled`, and end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.errors import NotFoundError
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.models import Job, JobStatus, utcnow
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.tracking import progress
from lumikb_pipeline.tracking.control import flag_cancelled


@dataclass(frozen=True)
class CancelReport:
    job_id: str
    already_finished: bool
    documents_cancelled: int
    runs_cancelled: int
    backfill_cancelled: bool
    status: str


def cancel_job(settings: Settings, job_id: str, instance: Any | None = None) -> CancelReport:
    """Cancel a job; idempotent. An unknown job is a NotFoundError (exit code 2)."""
    with session_scope(settings.effective_database_url) as session:
        job = ledger.find_job(session, job_id, for_update=True)
        if job is None:
            raise NotFoundError(
                f"job {job_id!r} does not exist; `lumikb reextract` prints the ids of the jobs it starts (a backfill "
                "launched in the Dagster UI is found by its backfill id too)"
            )
        job_id = job.id
        if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
            return CancelReport(job_id, True, 0, 0, False, job.status.value)
        job.cancel_requested_at = job.cancel_requested_at or utcnow()
        job.updated_at = utcnow()
        backfill_id = job.dagster_backfill_id
    client = redis_client.connect(settings)
    flag_cancelled(client, job_id)
    with session_scope(settings.effective_database_url) as session:
        pending = ledger.pending_document_ids(session, job_id)
        cancelled = ledger.cancel_pending(session, job_id, "cancelled by `lumikb cancel` before it started")
    progress.report(client, job_id, [(doc_id, "cancelled", 0.0, "cancelled before it started") for doc_id in pending])
    runs, backfill = _cancel_dagster_work(settings, job_id, backfill_id, instance)
    with session_scope(settings.effective_database_url) as session:
        ledger.finish_job_if_done(session, job_id)
        status = session.get_one(Job, job_id).status.value
    return CancelReport(job_id, False, cancelled, runs, backfill, status)


def _cancel_dagster_work(
    settings: Settings, job_id: str, backfill_id: str | None, instance: Any | None
) -> tuple[int, bool]:
    from dagster import DagsterRunStatus, RunsFilter
    from dagster._core.execution.backfill import BulkActionStatus

    from lumikb_pipeline.core.names import TAG_JOB_ID
    from lumikb_pipeline.infra.dagster_instance import open_instance

    instance = instance or open_instance(settings)
    backfill_cancelled = False
    if backfill_id is not None:
        backfill = instance.get_backfill(backfill_id)
        if backfill is not None and backfill.status == BulkActionStatus.REQUESTED:
            instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))
            backfill_cancelled = True
    queued = instance.get_runs(
        RunsFilter(tags={TAG_JOB_ID: job_id}, statuses=[DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED])
    )
    for run in queued:
        instance.report_run_canceled(run, message="cancelled by `lumikb cancel`")
    return len(queued), backfill_cancelled
