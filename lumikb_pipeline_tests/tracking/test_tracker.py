"""Progress in the real Redis: atomic, idempotent, rebuilt from the ledger."""

from __future__ import annotations

import redis
from sqlalchemy import select

from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.catalog import create_kb
from lumikb_pipeline.db.models import Document, ExtractionRecord, Job, JobStatus, JobTrigger
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_text
from lumikb_pipeline.tracking.progress import job_progress
from lumikb_pipeline.tracking.tracker import ProgressTracker


def _job_with_documents(url: str, count: int) -> tuple[str, list[str]]:
    with session_scope(url) as session:
        kb = create_kb(session, "acme", parse_schema_text("entity_types:\n  - name: Person\n"))
        docs = [Document(kb_id=kb.id, title=f"d{i}", source=f"/d{i}", content_hash="h") for i in range(count)]
        session.add_all(docs)
        job = Job(kb_id=kb.id, target_schema_version=1, selection={"kind": "all"}, trigger=JobTrigger.CLI,
                  total_documents=count, status=JobStatus.RUNNING)
        session.add(job)
        session.flush()
        ledger.ensure_records(session, kb.id, [d.id for d in docs], 1, job.id)
        return job.id, [d.id for d in docs]


def _finish(url: str, client: redis.Redis, job_id: str, doc: str, ok: bool) -> None:
    tracker = ProgressTracker(client)
    with session_scope(url) as session:
        assert ledger.claim(session, doc, 1, "w", job_id)
        if ok:
            ledger.mark_succeeded(session, doc, 1, "w", ledger.Outcome(cost_usd=0.01))
        else:
            ledger.mark_failed(session, doc, 1, "w", f"boom in {doc}")
    tracker.record(job_id, doc, "succeeded" if ok else "failed", cost_usd=0.01 if ok else 0.0,
                   error=None if ok else f"boom in {doc}")


def test_progress_counts_agree_with_the_ledger_and_add_up(pg_url: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job_id, docs = _job_with_documents(pg_url, 10)
    ProgressTracker(client).start(job_id, 10)
    for i, doc in enumerate(docs[:6]):
        _finish(pg_url, client, job_id, doc, ok=i != 2)
    with session_scope(pg_url) as session:
        progress = job_progress(session, client, job_id)
    assert (progress.total, progress.completed, progress.failed, progress.remaining) == (10, 5, 1, 4)
    # Six finishes within a fraction of a second are no pace yet: no rate and no ETA, not a guess.
    assert progress.rate_per_s is None and progress.eta_seconds is None
    assert progress.recent_errors[0]["doc_id"] == docs[2]
    assert progress.spend_usd == 0.05
    assert set(progress.contract_json()) == {
        "job_id", "status", "total", "completed", "failed", "cancelled", "remaining", "rate_per_s", "eta_seconds",
        "started_at", "updated_at", "recent_errors",
    }


def test_recording_the_same_outcome_twice_or_an_older_state_changes_nothing(redis_url: str) -> None:
    tracker = ProgressTracker(redis.Redis.from_url(redis_url, decode_responses=True))
    tracker.start("j", 3)
    assert tracker.record("j", "d1", "succeeded", cost_usd=0.5)
    assert not tracker.record("j", "d1", "succeeded", cost_usd=0.5)
    assert not tracker.record("j", "d1", "running")
    assert not tracker.record("j", "d1", "failed", error="late failure report")
    figures = tracker.read("j")
    assert (figures.completed, figures.failed, figures.spend_usd) == (1, 0, 0.5)


def test_a_failed_document_that_later_succeeds_moves_from_failed_to_completed(redis_url: str) -> None:
    tracker = ProgressTracker(redis.Redis.from_url(redis_url, decode_responses=True))
    tracker.start("j", 1)
    tracker.record("j", "d1", "failed", error="429 from the provider")
    assert tracker.read("j").recent_errors[0].error == "429 from the provider"
    tracker.record("j", "d1", "succeeded")
    figures = tracker.read("j")
    assert (figures.completed, figures.failed, figures.recent_errors) == (1, 0, [])


def test_cancelled_documents_are_counted_apart_from_failures_and_the_rate(redis_url: str) -> None:
    tracker = ProgressTracker(redis.Redis.from_url(redis_url, decode_responses=True))
    tracker.start("j", 10)
    for i in range(4):
        tracker.record("j", f"d{i}", "succeeded", at=1000.0 + i)
    tracker.record("j", "d4", "failed", at=1004.0, error="boom")
    for i in range(5, 10):
        tracker.record("j", f"d{i}", "cancelled", at=1005.0, error="the job was cancelled")
    figures = tracker.read("j")
    assert (figures.completed, figures.failed, figures.cancelled) == (4, 1, 5)
    assert [e.error for e in figures.recent_errors] == ["boom"]
    assert figures.finishes == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]  # the work done, not the cancels
    # A cancelled document that a later run finishes moves from cancelled to completed.
    tracker.record("j", "d5", "succeeded", at=1010.0)
    figures = tracker.read("j")
    assert (figures.completed, figures.cancelled) == (5, 4)


def test_only_the_last_ten_errors_are_kept_newest_first(redis_url: str) -> None:
    tracker = ProgressTracker(redis.Redis.from_url(redis_url, decode_responses=True))
    tracker.start("j", 15)
    for i in range(15):
        tracker.record("j", f"d{i}", "failed", at=1000.0 + i, error=f"error {i}")
    errors = tracker.read("j").recent_errors
    assert [e.error for e in errors] == [f"error {i}" for i in range(14, 4, -1)]


def test_progress_is_rebuilt_from_the_ledger_after_redis_lost_it(pg_url: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job_id, docs = _job_with_documents(pg_url, 8)
    for i, doc in enumerate(docs[:5]):
        _finish(pg_url, client, job_id, doc, ok=i != 0)
    client.flushdb()
    with session_scope(pg_url) as session:
        progress = job_progress(session, client, job_id)
        statuses = list(session.scalars(select(ExtractionRecord.status).where(ExtractionRecord.job_id == job_id)))
    assert (progress.total, progress.completed, progress.failed, progress.cancelled, progress.remaining) == (
        8, 4, 1, 0, 3
    )
    assert sum(s.value == "succeeded" for s in statuses) == progress.completed
    assert progress.recent_errors[0]["error"] == f"boom in {docs[0]}"
    # A worker's late report of something the rebuild already holds changes nothing.
    assert not ProgressTracker(client).record(job_id, docs[1], "succeeded", cost_usd=0.01)
