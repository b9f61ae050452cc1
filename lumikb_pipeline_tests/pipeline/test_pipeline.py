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
from lumikb_pipeline.pipeline.extract import extract_documents
from lumikb_pipeline.pipeline.write import write_documents

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


def _run(doc_ids: list[str], job_id: str | None = None, claimant: str = "test-run") -> list[str]:
    settings = load_settings()
    extractor = ChunkExtractor(settings)
    store = open_graph_store(settings)
    try:
        extracted = extract_documents(settings, extractor, doc_ids, claimant=claimant, job_id=job_id)
        written = write_documents(settings, store, extracted, claimant=claimant, job_id=job_id)
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


def _job(settings_url: str, doc_ids: list[str], status: JobStatus = JobStatus.RUNNING) -> str:
    from lumikb_pipeline.db import ledger

    with session_scope(settings_url) as session:
        kb = catalog.get_kb(session, "demo")
        job = Job(kb_id=kb.id, target_schema_version=1, selection={"kind": "all"}, trigger=JobTrigger.CLI,
                  total_documents=len(doc_ids), status=JobStatus.RUNNING)
        session.add(job)
        session.flush()
        ledger.ensure_records(session, kb.id, doc_ids, 1, job.id)
        job.status = status
        return job.id


def _rows(settings_url: str) -> dict[str, ExtractionRecord]:
    with session_scope(settings_url) as session:
        rows = {r.document_id: r for r in session.scalars(select(ExtractionRecord))}
        session.expunge_all()
    return rows


def test_an_infrastructure_error_in_the_graph_write_fails_the_held_rows_with_the_error(
    demo_kb: list[str], tmp_path: Path
) -> None:
    """The graph store is unusable (here: its file cannot be created) in the middle of a job: the step
    raises for its retry, and the rows it held are `failed` with the error, shown in the job's
    recent errors, instead of staying `running`."""
    from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
    from lumikb_pipeline.infra import redis_client
    from lumikb_pipeline.tracking.progress import job_progress

    settings = load_settings()
    doc_ids = demo_kb[:3]
    job_id = _job(settings.effective_database_url, doc_ids)
    (tmp_path / "not-a-directory").write_text("")
    broken = EmbeddedGraphStore(tmp_path / "not-a-directory" / "graph.sqlite3")
    extracted = extract_documents(settings, ChunkExtractor(settings), doc_ids, claimant="run-1", job_id=job_id)

    with pytest.raises(OSError):
        write_documents(settings, broken, extracted, claimant="run-1", job_id=job_id)

    rows = _rows(settings.effective_database_url)
    assert {rows[d].status for d in doc_ids} == {ExtractionStatus.FAILED}
    assert all("infrastructure" in (rows[d].last_error or "") for d in doc_ids)
    with session_scope(settings.effective_database_url) as session:
        progress = job_progress(session, redis_client.connect(settings), job_id)
        assert session.get_one(Job, job_id).status == JobStatus.RUNNING  # the step's retry may finish it
    assert progress.failed == 3 and len(progress.recent_errors) == 3
    assert "infrastructure" in progress.recent_errors[0]["error"]
    # The step's retry takes the failed rows back and finishes the job.
    retried = extract_documents(settings, ChunkExtractor(settings), doc_ids, claimant="run-1", job_id=job_id)
    store = open_graph_store(settings)
    try:
        assert [o.status for o in write_documents(settings, store, retried, claimant="run-1", job_id=job_id)] == [
            "succeeded"] * 3
    finally:
        store.close()
    with session_scope(settings.effective_database_url) as session:
        assert session.get_one(Job, job_id).status == JobStatus.SUCCEEDED


def test_a_document_whose_attempts_keep_dying_is_failed_with_a_clear_error(demo_kb: list[str]) -> None:
    """Each attempt at the document died mid-step (its row stayed `running`); the redelivery after the
    last allowed attempt gives up instead of trying forever."""
    from lumikb_pipeline.db import ledger

    settings = load_settings()
    [doc_id] = demo_kb[:1]
    job_id = _job(settings.effective_database_url, [doc_id])
    with session_scope(settings.effective_database_url) as session:
        for _ in range(ledger.MAX_ATTEMPTS):  # claimed, then the worker died (out of memory)
            assert ledger.claim(session, doc_id, 1, "run-1", job_id)

    (outcome,) = extract_documents(settings, ChunkExtractor(settings), [doc_id], claimant="run-1", job_id=job_id)

    assert outcome.status == "failed" and f"given up after {ledger.MAX_ATTEMPTS} attempts" in (outcome.error or "")
    row = _rows(settings.effective_database_url)[doc_id]
    assert row.status == ExtractionStatus.FAILED and "given up" in (row.last_error or "")
    with session_scope(settings.effective_database_url) as session:
        assert session.get_one(Job, job_id).status == JobStatus.FAILED


@pytest.mark.parametrize("ended", [JobStatus.SUCCEEDED, JobStatus.CANCELLED])
def test_a_late_redelivery_of_a_step_of_an_ended_job_changes_nothing(demo_kb: list[str], ended: JobStatus) -> None:
    settings = load_settings()
    doc_ids = demo_kb[:2]
    job_id = _job(settings.effective_database_url, doc_ids, status=ended)
    with session_scope(settings.effective_database_url) as session:
        session.get_one(Job, job_id).cancel_requested_at = (
            session.get_one(Job, job_id).created_at if ended == JobStatus.CANCELLED else None
        )
    before = {d: (r.status, r.attempts, r.claimed_by) for d, r in _rows(settings.effective_database_url).items()}

    outcomes = extract_documents(settings, ChunkExtractor(settings), doc_ids, claimant="stale-run", job_id=job_id)

    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert all("has ended" in (o.error or "") for o in outcomes)
    after = {d: (r.status, r.attempts, r.claimed_by) for d, r in _rows(settings.effective_database_url).items()}
    assert after == before
    with session_scope(settings.effective_database_url) as session:
        assert session.get_one(Job, job_id).status == ended


@pytest.mark.parametrize("stage", ["extract", "write"])
def test_a_step_whose_run_failed_under_it_leaves_its_documents_to_the_retry_instead_of_cancelling_them(
    demo_kb: list[str], stage: str
) -> None:
    """The run process of a step died and the watchdog failed the run (chaos scenario 3): the
    orphaned step sees its run ended, stops, and leaves its documents claimed and untouched, so the
    run's retry (same claimant) does them; the job is not closed `cancelled`."""
    settings = load_settings()
    doc_ids = demo_kb[:3]
    job_id = _job(settings.effective_database_url, doc_ids)
    run_ended = lambda: True  # noqa: E731 - the step's RunEndWatch, after the run failed
    if stage == "extract":
        outcomes = extract_documents(settings, ChunkExtractor(settings), doc_ids, claimant="run-1", job_id=job_id,
                                     should_stop=run_ended, run_failed=run_ended)
    else:
        extracted = extract_documents(settings, ChunkExtractor(settings), doc_ids, claimant="run-1", job_id=job_id)
        store = open_graph_store(settings)
        try:
            outcomes = write_documents(settings, store, extracted, claimant="run-1", job_id=job_id,
                                       should_stop=run_ended, run_failed=run_ended)
        finally:
            store.close()

    assert [o.status for o in outcomes] == ["handed_back"] * 3
    assert all("left the document claimed by run-1 for the run's retry" in (o.error or "") for o in outcomes)
    rows = _rows(settings.effective_database_url)
    assert {(rows[d].status, rows[d].claimed_by) for d in doc_ids} == {(ExtractionStatus.RUNNING, "run-1")}
    with session_scope(settings.effective_database_url) as session:
        assert session.get_one(Job, job_id).status == JobStatus.RUNNING
    # The run's retry takes them over and finishes the job.
    assert _run(doc_ids, job_id, claimant="run-1") == ["succeeded"] * 3
    with session_scope(settings.effective_database_url) as session:
        assert session.get_one(Job, job_id).status == JobStatus.SUCCEEDED


def test_a_step_whose_run_was_cancelled_under_it_cancels_its_documents(demo_kb: list[str]) -> None:
    settings = load_settings()
    doc_ids = demo_kb[:2]
    job_id = _job(settings.effective_database_url, doc_ids)

    outcomes = extract_documents(settings, ChunkExtractor(settings), doc_ids, claimant="run-1", job_id=job_id,
                                 should_stop=lambda: True, run_failed=lambda: False)

    assert [o.status for o in outcomes] == ["cancelled"] * 2
    rows = _rows(settings.effective_database_url)
    assert {rows[d].status for d in doc_ids} == {ExtractionStatus.CANCELLED}
