"""A job's status kept in line with its Dagster backfill (the job-status sensor, `lumikb reextract --wait`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.errors import NotFoundError
from lumikb_pipeline.core.names import TAG_BACKFILL
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.models import Document, ExtractionRecord, Job, JobStatus, KnowledgeBase, utcnow
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.reextraction.service import TERMINAL, backfill_id_for, launch_job

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph


def job_documents(session: Session, job: Job) -> list[str]:
    """The documents a job covers: its ledger rows, in ingestion order."""
    return list(
        session.scalars(
            select(ExtractionRecord.document_id)
            .join(Document, Document.id == ExtractionRecord.document_id)
            .where(ExtractionRecord.job_id == job.id, ExtractionRecord.schema_version == job.target_schema_version)
            .order_by(Document.created_at, Document.id)
        )
    )


def refresh_job_status(
    settings: Settings, job_id: str, instance: DagsterInstance, asset_graph: BaseAssetGraph | None = None
) -> Job:
    """Bring a job's status, run ids and times in line with its Dagster backfill; returns the job.

    A job whose launch was interrupted (recorded, no backfill yet) is launched now (with `asset_graph`).
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
        if asset_graph is not None:
            launch_job(settings, job, doc_ids, kb_slug=kb_slug, instance=instance, asset_graph=asset_graph)
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
