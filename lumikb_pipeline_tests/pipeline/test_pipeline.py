"""The two extraction stages end to end, in-process: ingest → extract (offline model) → graph → ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.db import catalog, migrate
from lumikb_pipeline.db.models import ExtractionRecord, ExtractionStatus, Job, JobStatus, JobTrigger
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_file
from lumikb_pipeline.graph import open_graph_store
from lumikb_pipeline.llm.extractor import ChunkExtractor
from lumikb_pipeline.pipeline import extract_documents, write_documents

DEMO = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo"


@pytest.fixture
def demo_kb(lumikb_env: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("LUMIKB_REDIS_URL", redis_url)
    settings = load_settings()
    migrate.ensure_database(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as session:
        catalog.create_kb(session, "demo", parse_schema_file(DEMO / "schema_v1.yaml"))
    report = catalog.ingest(settings.effective_database_url, "demo", [DEMO / "corpus"])
    assert not report.errors
    return report.document_ids


def _run(doc_ids: list[str], job_id: str | None = None) -> list[str]:
    settings = load_settings()
    extractor = ChunkExtractor(settings)
    store = open_graph_store(settings)
    try:
        extracted = extract_documents(settings, extractor, doc_ids, claimant="test-run", job_id=job_id)
        written = write_documents(settings, store, extracted, claimant="test-run", job_id=job_id)
    finally:
        store.close()
    return [o.status for o in written]


def test_documents_are_extracted_into_the_graph_and_the_ledger(demo_kb: list[str]) -> None:
    assert _run(demo_kb) == ["succeeded"] * len(demo_kb)
    settings = load_settings()
    store = open_graph_store(settings)
    counts = store.counts("demo")
    store.close()
    assert counts.documents == len(demo_kb) and counts.entities > 50 and counts.relationships > 20
    with session_scope(settings.effective_database_url) as session:
        records = list(session.scalars(select(ExtractionRecord)))
    assert {r.status for r in records} == {ExtractionStatus.SUCCEEDED}
    assert all(r.entity_count > 0 and r.llm_calls > 0 for r in records)


def test_running_again_skips_documents_already_done_and_calls_no_llm(demo_kb: list[str]) -> None:
    _run(demo_kb[:5])
    assert _run(demo_kb[:5]) == ["skipped"] * 5


def test_a_job_closes_when_its_last_document_is_final(demo_kb: list[str]) -> None:
    settings = load_settings()
    from lumikb_pipeline.db import ledger

    with session_scope(settings.effective_database_url) as session:
        kb = catalog.get_kb(session, "demo")
        job = Job(kb_id=kb.id, target_schema_version=1, selection={"kind": "all"}, trigger=JobTrigger.CLI,
                  total_documents=4, status=JobStatus.RUNNING)
        session.add(job)
        session.flush()
        ledger.ensure_records(session, kb.id, demo_kb[:4], 1, job.id)
        job_id = job.id
    assert _run(demo_kb[:2], job_id) == ["succeeded"] * 2
    with session_scope(settings.effective_database_url) as session:
        assert session.get_one(Job, job_id).status == JobStatus.RUNNING
    _run(demo_kb[2:4], job_id)
    with session_scope(settings.effective_database_url) as session:
        assert session.get_one(Job, job_id).status == JobStatus.SUCCEEDED


def test_a_late_write_at_an_older_schema_version_is_skipped_and_keeps_the_newer_graph(demo_kb: list[str]) -> None:
    """Normal processing extracts a document at v1; before it writes, the schema sensor's job extracts
    and writes it at v2. The v1 write then lands last: it is refused, and its ledger row says so."""
    settings = load_settings()
    doc_id = demo_kb[0]
    store = open_graph_store(settings)
    try:
        at_v1 = extract_documents(settings, ChunkExtractor(settings), [doc_id], claimant="normal", schema_version=1)
        with session_scope(settings.effective_database_url) as session:
            catalog.set_schema(session, "demo", parse_schema_file(DEMO / "schema_v2.yaml"))
        at_v2 = extract_documents(settings, ChunkExtractor(settings), [doc_id], claimant="sensor", schema_version=2)
        assert [o.status for o in write_documents(settings, store, at_v2, claimant="sensor")] == ["succeeded"]
        v2_graph = store.dump("demo")

        (late,) = write_documents(settings, store, at_v1, claimant="normal")

        assert late.status == "skipped"
        assert "schema version 2, newer than this extraction's 1" in (late.error or "")
        assert store.dump("demo") == v2_graph
        documents = [n["properties"] for n in v2_graph.nodes if n["labels"] == ["Document"]]
        assert documents == [{"id": doc_id, "kb_id": "demo", "schema_version": 2}]
    finally:
        store.close()
    with session_scope(settings.effective_database_url) as session:
        rows = {r.schema_version: r for r in session.scalars(select(ExtractionRecord))}
    assert rows[2].status == ExtractionStatus.SUCCEEDED
    assert rows[1].status == ExtractionStatus.SKIPPED and "newer than" in (rows[1].last_error or "")
