"""Job progress: what `lumikb progress` shows and the workers report.

Workers call `report` after each document's ledger row is final; readers call `job_progress`,
which rebuilds Redis from the ledger when Redis has lost the job's keys.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import redis
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.errors import NotFoundError
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.models import ExtractionRecord, ExtractionStatus, Job, JobStatus
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.eta import eta_seconds, rate_per_second
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.tracking.tracker import ProgressTracker, RecentError


@dataclass
class JobProgress:
    """`lumikb progress JOB --json` (PRODUCT.md section 5), plus spend for the human view.

    `completed + failed + cancelled + remaining == total`; `rate_per_s` and `eta_seconds` are None
    until the job has finished enough documents to measure its pace (see `domain.eta`)."""

    job_id: str
    status: str
    total: int
    completed: int
    failed: int
    cancelled: int
    remaining: int
    rate_per_s: float | None
    eta_seconds: float | None
    started_at: str | None
    updated_at: str | None
    recent_errors: list[dict[str, str]]
    spend_usd: float = 0.0

    def contract_json(self) -> dict[str, object]:
        """Exactly the fields of the contract."""
        data = asdict(self)
        data.pop("spend_usd")
        return data


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch is not None else None


def _epoch(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def rebuild_from_ledger(session: Session, tracker: ProgressTracker, job: Job) -> None:
    """Replay the ledger's rows of a job into Redis (idempotent; safe beside live workers)."""
    tracker.start(job.id, job.total_documents, _epoch(job.started_at or job.created_at))
    rows = session.execute(
        select(
            ExtractionRecord.document_id, ExtractionRecord.status, ExtractionRecord.finished_at,
            ExtractionRecord.cost_usd, ExtractionRecord.last_error,
        ).where(ExtractionRecord.job_id == job.id)
    ).tuples()
    for doc_id, status, finished_at, cost, error in rows:
        if status in (ExtractionStatus.PENDING, ExtractionStatus.RUNNING):
            continue
        tracker.record(
            job.id, doc_id, status.value, at=_epoch(finished_at) or time.time(), cost_usd=cost or 0.0,
            error=error if status == ExtractionStatus.FAILED else None,
        )


def job_progress(session: Session, client: redis.Redis, job_id: str, now: float | None = None) -> JobProgress:
    """A job's progress from Redis, rebuilt from the ledger first if Redis has lost it."""
    job = ledger.find_job(session, job_id)
    if job is None:
        raise NotFoundError(
            f"job {job_id!r} does not exist; `lumikb reextract` prints job ids (a backfill launched in the Dagster UI "
            "is found by its backfill id too), and finished jobs are kept in the app database"
        )
    tracker = ProgressTracker(client)
    now = now or time.time()
    figures = tracker.read(job.id)
    if not figures.present:
        rebuild_from_ledger(session, tracker, job)
        figures = tracker.read(job.id)
    total = max(figures.total, job.total_documents)
    done = figures.completed + figures.failed + figures.cancelled
    remaining = max(0, total - done)
    status = job.status.value
    ended = status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
    rate = rate_per_second(figures.finishes, (figures.updated_at or now) if ended else now)
    if status == JobStatus.RUNNING.value and job.cancel_requested_at is not None:
        status = "cancelling"
    return JobProgress(
        job_id=job.id,
        status=status,
        total=total,
        completed=figures.completed,
        failed=figures.failed,
        cancelled=figures.cancelled,
        remaining=remaining,
        rate_per_s=None if rate is None else round(rate, 4),
        eta_seconds=None if (eta := eta_seconds(0 if ended else remaining, rate)) is None else round(eta, 1),
        started_at=_iso(figures.started_at),
        updated_at=_iso(figures.updated_at or figures.started_at),
        recent_errors=[{"doc_id": e.doc_id, "error": e.error, "at": _iso(e.at) or ""} for e in figures.recent_errors],
        spend_usd=round(figures.spend_usd, 6),
    )


def job_metadata(settings: Settings, job_id: str) -> dict[str, object]:
    """The job's progress as Dagster metadata for a materialization of one of its documents (the
    figures `lumikb progress --json` shows); empty when it cannot be read (never fails a step)."""
    try:
        with session_scope(settings.effective_database_url) as session:
            figures = job_progress(session, redis_client.connect(settings), job_id)
    except (redis.RedisError, SQLAlchemyError, NotFoundError):
        return {}
    return {
        "job_documents_done": f"{figures.total - figures.remaining} of {figures.total}",
        "job_rate_per_s": figures.rate_per_s,
        "job_eta_seconds": figures.eta_seconds,
    }


def report(
    client: redis.Redis, job_id: str, outcomes: Iterable[tuple[str, str, float, str | None]]
) -> None:
    """Record (doc_id, status, cost_usd, error) outcomes of a job's documents; never raises for a
    Redis hiccup, since the ledger already holds the truth and progress is rebuilt from it."""
    tracker = ProgressTracker(client)
    try:
        for doc_id, status, cost, error in outcomes:
            tracker.record(job_id, doc_id, status, cost_usd=cost, error=error)
    except redis.RedisError:
        pass


__all__ = ["JobProgress", "RecentError", "job_metadata", "job_progress", "rebuild_from_ledger", "report"]
