"""Honest claims (issue 12): a ledger claim is a lease that is renewed while its step works, and a
step whose claim was lost never writes the document. Real PostgreSQL, Redis and the fake LLM server."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.db import catalog
from lumikb_pipeline.db.models import ExtractionRecord, ExtractionStatus, utcnow
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_file
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.llm.extractor import ChunkExtractor
from lumikb_pipeline.pipeline.extract import extract_documents
from lumikb_pipeline.pipeline.work import DocumentOutcome
from lumikb_pipeline.pipeline.write import write_documents
from lumikb_pipeline_tests.fake_llm import FakeServer

DEMO = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo"


@pytest.fixture
def settings(fake_llm: FakeServer, pg_url: str, redis_url: str, tmp_path: Path) -> Settings:
    fake_llm.reset()
    fake_llm.configure(rate_429=0.0, retry_after_s=0.5, latency_mean_s=0.0)
    return Settings(
        home=tmp_path / "home", database_url=pg_url, redis_url=redis_url, llm_model="openai/gpt-4o-mini",
        llm_api_base=fake_llm.api_base, llm_api_key="sk-test-key", llm_rate_limit="50/s", llm_max_attempts=20,
    )


@pytest.fixture
def doc_id(settings: Settings) -> str:
    """One multi-chunk document of the demo corpus in KB `demo`."""
    with session_scope(settings.effective_database_url) as session:
        catalog.create_kb(session, "demo", parse_schema_file(DEMO / "schema_v1.yaml"))
    report = catalog.ingest(settings.effective_database_url, "demo", [DEMO / "corpus" / "01-northwind-profile.md"])
    assert not report.errors and len(report.document_ids) == 1
    return report.document_ids[0]


def ledger_row(settings: Settings, doc_id: str) -> ExtractionRecord:
    with session_scope(settings.effective_database_url) as session:
        row = session.scalars(select(ExtractionRecord).where(ExtractionRecord.document_id == doc_id)).one()
        session.expunge(row)
        return row


def claimed_by(settings: Settings, doc_id: str) -> str | None:
    with session_scope(settings.effective_database_url) as session:
        return session.scalar(select(ExtractionRecord.claimed_by).where(ExtractionRecord.document_id == doc_id))


def wait_until(condition: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # seconds of 429s waited out: out of the fast step
def test_a_lease_outlives_a_429_storm_so_no_second_worker_takes_the_document(
    settings: Settings, doc_id: str, fake_llm: FakeServer, tmp_path: Path
) -> None:
    """Worker A's extraction sits in a 429 storm for several times its lease; worker B, arriving then,
    must not get the document (A's heartbeat renewed the lease), and only A writes it."""
    lease = timedelta(seconds=1.5)
    fake_llm.configure(rate_429=1.0, retry_after_s=0.5)
    extracted: dict[str, list[DocumentOutcome]] = {}

    def worker(name: str) -> None:
        extracted[name] = extract_documents(
            settings, ChunkExtractor(settings), [doc_id], claimant=name, schema_version=1, lease=lease
        )

    a = threading.Thread(target=worker, args=("worker-a",))
    a.start()
    wait_until(lambda: claimed_by(settings, doc_id) == "worker-a")
    wait_until(lambda: any(c["status"] == 429 for c in fake_llm.calls()))
    time.sleep(3 * lease.total_seconds())  # without renewal, A's lease would have expired twice over
    assert a.is_alive(), "A should still be in the 429 storm"
    b = threading.Thread(target=worker, args=("worker-b",))
    b.start()
    time.sleep(1.0)
    fake_llm.configure(rate_429=0.0)  # the storm ends
    a.join(timeout=120)
    b.join(timeout=120)
    assert not a.is_alive() and not b.is_alive()

    assert [o.status for o in extracted["worker-b"]] == ["skipped"]
    assert [o.status for o in extracted["worker-a"]] == ["extracted"]
    store = EmbeddedGraphStore(tmp_path / "graph.sqlite3")
    written = [
        o.status
        for name in ("worker-a", "worker-b")
        for o in write_documents(settings, store, extracted[name], claimant=name, lease=lease)
    ]
    assert written.count("succeeded") == 1
    row = ledger_row(settings, doc_id)
    assert (row.status, row.claimed_by, row.attempts) == (ExtractionStatus.SUCCEEDED, "worker-a", 1)


def test_a_step_whose_claim_was_taken_over_does_not_write_the_document(
    settings: Settings, doc_id: str, tmp_path: Path
) -> None:
    """A stalls between extraction and write past its lease; B takes the document. A's write must
    not happen (it would race B's), and B's write is the one that counts."""
    store = EmbeddedGraphStore(tmp_path / "graph.sqlite3")
    from_a = extract_documents(settings, ChunkExtractor(settings), [doc_id], claimant="worker-a", schema_version=1)
    assert [o.status for o in from_a] == ["extracted"]
    with session_scope(settings.effective_database_url) as session:  # A's lease runs out while it stalls
        session.execute(
            update(ExtractionRecord)
            .where(ExtractionRecord.document_id == doc_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    from_b = extract_documents(settings, ChunkExtractor(settings), [doc_id], claimant="worker-b", schema_version=1)
    assert [o.status for o in from_b] == ["extracted"]

    (late,) = write_documents(settings, store, from_a, claimant="worker-a")

    assert late.status == "lost" and "claim lost" in (late.error or "")
    assert store.counts("demo").documents == 0, "A wrote a document it no longer held"
    assert ledger_row(settings, doc_id).status == ExtractionStatus.RUNNING
    assert [o.status for o in write_documents(settings, store, from_b, claimant="worker-b")] == ["succeeded"]
    assert store.counts("demo").documents == 1
    row = ledger_row(settings, doc_id)
    assert (row.status, row.claimed_by) == (ExtractionStatus.SUCCEEDED, "worker-b")
