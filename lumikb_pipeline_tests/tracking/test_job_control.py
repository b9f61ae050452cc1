"""A re-extraction job against the fake LLM server: progress sampled every half second, Redis
flushed mid-job, cancel, and the --max-cost budget. The job's documents are worked by a thread
that does what a Dagster step does (extract, then write, batch by batch)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.db import catalog, ledger
from lumikb_pipeline.db.models import ExtractionRecord, ExtractionStatus, Job, JobStatus
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.graph import open_graph_store
from lumikb_pipeline.llm.extractor import ChunkExtractor
from lumikb_pipeline.pipeline.extract import extract_documents
from lumikb_pipeline.pipeline.write import write_documents
from lumikb_pipeline.reextraction.cancel import cancel_job
from lumikb_pipeline.reextraction.service import Selection, start_reextraction
from lumikb_pipeline.tracking.progress import job_progress
from lumikb_pipeline_tests.fake_llm import FakeServer
from lumikb_pipeline_tests.tracking.conftest import reports_kb

DOCUMENTS = 60


@pytest.fixture
def job_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str, redis_url: str, fake_llm: FakeServer
) -> list[str]:
    """A KB `acme` of 60 reports; the fake LLM answers in 0.15 s (± 0.05 s)."""
    fake_llm.configure(latency_mean_s=0.15, latency_jitter_s=0.05)
    return reports_kb(monkeypatch, tmp_path, slug="acme", documents=DOCUMENTS, database_url=pg_url,
                      redis_url=redis_url, llm=fake_llm, rate_limit="20/s")


class Worker(threading.Thread):
    """Works a job's documents in batches, as the Dagster steps do."""

    def __init__(self, doc_ids: list[str], job_id: str, batch: int = 5) -> None:
        super().__init__(daemon=True)
        self.doc_ids, self.job_id, self.batch = doc_ids, job_id, batch
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            settings = load_settings()
            extractor = ChunkExtractor(settings)
            store = open_graph_store(settings)
            for start in range(0, len(self.doc_ids), self.batch):
                batch = self.doc_ids[start : start + self.batch]
                extracted = extract_documents(settings, extractor, batch, claimant="worker", job_id=self.job_id)
                write_documents(settings, store, extracted, claimant="worker", job_id=self.job_id)
            store.close()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def _ledger(job_id: str) -> dict[ExtractionStatus, int]:
    with session_scope(load_settings().effective_database_url) as session:
        return ledger.status_counts(session, job_id)


def _progress(job_id: str, client: redis.Redis) -> dict[str, object]:
    with session_scope(load_settings().effective_database_url) as session:
        return job_progress(session, client, job_id).contract_json()


@pytest.mark.slow  # samples progress through a whole job (about 11 s)
def test_progress_adds_up_never_goes_back_and_agrees_with_the_ledger(job_env: list[str], redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job = start_reextraction(load_settings(), "acme", Selection.outdated(), launch=False)
    worker = Worker(job_env, job.id)
    worker.start()
    samples = []
    while worker.is_alive():
        samples.append(_progress(job.id, client))
        time.sleep(0.5)
    worker.join()
    assert worker.error is None
    samples.append(_progress(job.id, client))
    assert len(samples) >= 4, "the job ran too fast to sample"
    for sample in samples:
        counted = sample["completed"] + sample["failed"] + sample["cancelled"] + sample["remaining"]  # type: ignore[operator]
        assert counted == sample["total"] == DOCUMENTS
    completed = [s["completed"] for s in samples]
    assert completed == sorted(completed), f"completed went down: {completed}"
    final = samples[-1]
    counts = _ledger(job.id)
    assert final["completed"] == counts[ExtractionStatus.SUCCEEDED] == DOCUMENTS
    assert final["status"] == "succeeded" and final["eta_seconds"] == 0.0
    assert any(s["rate_per_s"] is not None and 0 < s["rate_per_s"] for s in samples)  # type: ignore[operator]


@pytest.mark.slow  # waits for the job around a FLUSHALL (about 11 s)
def test_progress_is_right_again_within_5_s_of_a_flushall_and_the_job_completes(
    job_env: list[str], redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job = start_reextraction(load_settings(), "acme", Selection.outdated(), launch=False)
    worker = Worker(job_env, job.id)
    worker.start()
    while _progress(job.id, client)["completed"] < 10:  # type: ignore[operator]
        time.sleep(0.2)
    client.flushall()
    flushed_at = time.monotonic()
    agreed = False
    while time.monotonic() - flushed_at < 5:
        before = _ledger(job.id)
        sample = _progress(job.id, client)
        after = _ledger(job.id)
        if before[ExtractionStatus.SUCCEEDED] <= sample["completed"] <= after[ExtractionStatus.SUCCEEDED]:  # type: ignore[operator]
            agreed = True
            break
        time.sleep(0.2)
    assert agreed, "progress did not agree with the ledger within 5 s of FLUSHALL"
    worker.join(timeout=120)
    assert worker.error is None
    final = _progress(job.id, client)
    assert final["completed"] == DOCUMENTS and final["remaining"] == 0 and final["status"] == "succeeded"


def test_after_cancel_no_llm_call_arrives_and_graph_and_ledger_agree(
    job_env: list[str], redis_url: str, fake_llm: FakeServer
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    settings = load_settings()
    job = start_reextraction(settings, "acme", Selection.outdated(), launch=False)
    worker = Worker(job_env, job.id)
    worker.start()
    while _progress(job.id, client)["completed"] < 8:  # type: ignore[operator]
        time.sleep(0.1)
    from dagster import DagsterInstance

    report = cancel_job(settings, job.id, instance=DagsterInstance.ephemeral())
    cancelled_at = time.time()
    worker.join(timeout=60)
    assert worker.error is None and not worker.is_alive()
    late = [c for c in fake_llm.calls() if c["arrived"] > cancelled_at + 1.0]
    assert late == [], f"{len(late)} LLM calls arrived more than 1 s after cancel returned"
    assert report.documents_cancelled > 0
    with session_scope(settings.effective_database_url) as session:
        rows = list(session.scalars(select(ExtractionRecord).where(ExtractionRecord.job_id == job.id)))
        assert session.get_one(Job, job.id).status == JobStatus.CANCELLED
    assert {r.status for r in rows} <= {ExtractionStatus.SUCCEEDED, ExtractionStatus.CANCELLED}
    store = open_graph_store(settings)
    try:
        in_graph = {r.document_id for r in rows if store.document_counts("acme", r.document_id).chunks > 0}
        assert store.entities_without_provenance("acme").count == 0
    finally:
        store.close()
    assert in_graph == {r.document_id for r in rows if r.status == ExtractionStatus.SUCCEEDED}
    final = _progress(job.id, client)
    assert final["status"] == "cancelled"
    # Documents the cancel stopped are `cancelled`, not `failed`, and the figures add up.
    assert final["failed"] == 0 and final["remaining"] == 0
    assert final["cancelled"] == sum(r.status == ExtractionStatus.CANCELLED for r in rows) > 0
    assert final["completed"] + final["cancelled"] == DOCUMENTS  # type: ignore[operator]


def test_max_cost_stops_the_job_within_one_batch_of_calls_past_its_budget(
    job_env: list[str], redis_url: str, fake_llm: FakeServer
) -> None:
    settings = load_settings()
    calls = fake_llm.calls()
    from lumikb_pipeline.reextraction.estimate import estimate_reextraction
    from lumikb_pipeline.reextraction.service import select_documents

    with session_scope(settings.effective_database_url) as session:
        kb = catalog.get_kb(session, "acme")
        doc_ids = select_documents(session, kb, Selection.outdated())
        estimate = estimate_reextraction(
            session, kb, catalog.current_schema(session, kb), 1, settings.llm_model, doc_ids
        )
    assert estimate.llm_calls == DOCUMENTS and estimate.estimated_cost_usd
    per_call = estimate.estimated_cost_usd / estimate.llm_calls
    budget = per_call * 10
    job = start_reextraction(settings, "acme", Selection.outdated(), launch=False, max_cost=budget)
    worker = Worker(job_env, job.id)
    worker.start()
    worker.join(timeout=120)
    assert worker.error is None
    with session_scope(settings.effective_database_url) as session:
        rows = list(session.scalars(select(ExtractionRecord).where(ExtractionRecord.job_id == job.id)))
        job_row = session.get_one(Job, job.id)
    spent = sum(r.cost_usd for r in rows)
    made = len(fake_llm.calls()) - len(calls)
    assert made < DOCUMENTS, "the budget did not stop the job"
    # At most one batch of calls (the in-flight cap, 4) past the budget.
    assert spent <= budget + 4 * max(r.cost_usd for r in rows if r.cost_usd), (spent, budget)
    assert job_row.status == JobStatus.CANCELLED
    assert any("budget" in (r.last_error or "") for r in rows if r.status == ExtractionStatus.CANCELLED)
    final = _progress(job.id, redis.Redis.from_url(redis_url, decode_responses=True))
    assert final["failed"] == 0 and final["cancelled"] == sum(r.status == ExtractionStatus.CANCELLED for r in rows) > 0
