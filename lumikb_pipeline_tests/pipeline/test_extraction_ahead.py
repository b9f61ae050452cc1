"""Extraction ahead (`pipeline.ahead`): a re-extraction step that has finished its own batch goes on
extracting its job's later documents, checkpoints only, until another step of the job extracts its
own batch; the documents' own runs then find their chunks checkpointed (waiting for those being
extracted ahead as they claim them), and nothing is paid twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lumikb_pipeline.core.config import Settings, load_settings
from lumikb_pipeline.db import catalog, ledger, migrate
from lumikb_pipeline.db.models import ExtractionStatus
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_file
from lumikb_pipeline.graph import open_graph_store
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.llm.extractor import ChunkExtractor
from lumikb_pipeline.pipeline.ahead import (
    OwnExtraction,
    ahead_documents_key,
    ahead_lock_key,
    extracting_key,
    in_progress_ahead,
    others_extracting,
    pick_ahead,
    take_ahead_lock,
)
from lumikb_pipeline.pipeline.extract import extract_documents
from lumikb_pipeline.pipeline.work import DocumentOutcome
from lumikb_pipeline.pipeline.write import write_documents
from lumikb_pipeline.reextraction.service import Selection, select_documents, start_reextraction
from lumikb_pipeline.tracking.control import flag_cancelled
from lumikb_pipeline_tests.fake_llm import FakeServer

DEMO = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo"
DOCUMENTS, CHUNKS, BATCH = 24, 2, 2


@dataclass
class AheadJob:
    settings: Settings
    job_id: str
    doc_ids: list[str]  # in partition order


@pytest.fixture
def job(lumikb_env: Path, redis_url: str, fake_llm: FakeServer, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> Iterator[AheadJob]:
    for name, value in {
        "LUMIKB_REDIS_URL": redis_url, "LUMIKB_LLM_MODEL": "openai/gpt-4o-mini",
        "LUMIKB_LLM_API_BASE": fake_llm.api_base, "LUMIKB_LLM_API_KEY": "sk-test-key",
        "LUMIKB_LLM_RATE_LIMIT": "20/s", "LUMIKB_REEXTRACT_BATCH_SIZE": str(BATCH),
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    migrate.ensure_database(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as session:
        catalog.create_kb(session, "ahead", parse_schema_file(DEMO / "schema_v1.yaml"))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(DOCUMENTS):
        (folder / f"doc-{i:03d}.txt").write_text("\n\n".join(
            f"Firm{i}p{p} Corporation employs Ann{i}p{p} Berg. Firm{i}p{p} Corporation is located in Town{p}."
            for p in range(CHUNKS)))
    report = catalog.ingest(settings.effective_database_url, "ahead", [folder], max_tokens=40)
    assert not report.errors
    fake_llm.configure(latency_mean_s=0.3, latency_jitter_s=0.0)
    started = start_reextraction(settings, "ahead", Selection.all(), launch=False)
    with session_scope(settings.effective_database_url) as session:
        order = select_documents(session, catalog.get_kb(session, "ahead"), Selection.all())
    assert sorted(order) == sorted(report.document_ids)
    fake_llm.reset()
    yield AheadJob(settings, started.id, order)
    fake_llm.configure(latency_mean_s=0.0)


def _extract_in_thread(
    job: AheadJob, doc_ids: list[str], claimant: str
) -> tuple[threading.Thread, list[DocumentOutcome]]:
    outcomes: list[DocumentOutcome] = []

    def run() -> None:
        outcomes.extend(extract_documents(job.settings, ChunkExtractor(job.settings), doc_ids, claimant=claimant,
                                          job_id=job.job_id, ahead_s=60))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcomes


def _ahead_documents(job: AheadJob) -> set[str]:
    return set(redis_client.connect(job.settings).smembers(ahead_documents_key(job.job_id)))  # type: ignore[arg-type]


def _chunks_called(fake: FakeServer) -> list[str]:
    return [call["chunk"] for call in fake.calls() if call["status"] == 200]


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_step_extracts_its_jobs_later_documents_ahead_until_another_step_extracts_its_own(
    job: AheadJob, fake_llm: FakeServer
) -> None:
    first = job.doc_ids[:BATCH]
    thread, outcomes = _extract_in_thread(job, first, "run-1")
    _wait(lambda: len(_chunks_called(fake_llm)) > BATCH * CHUNKS + 4, 30, "calls for documents ahead")
    assert thread.is_alive()  # nobody else extracts: it goes on ahead
    # The next run's step starts extracting its own batch: the first step hands over and ends.
    with OwnExtraction(redis_client.connect(job.settings), job.job_id, "run-2"):
        thread.join(timeout=15)
        assert not thread.is_alive()
    assert [o.status for o in outcomes] == ["extracted"] * BATCH
    ahead = _ahead_documents(job)
    # Later documents, taken from the job's end.
    assert ahead and ahead <= set(job.doc_ids[BATCH:])
    assert len(ahead) < DOCUMENTS - BATCH  # it stopped when handed over
    with session_scope(job.settings.effective_database_url) as session:
        rows = ledger.records_for(session, job.doc_ids, 1)
        assert all(rows[doc_id].status == ExtractionStatus.PENDING for doc_id in ahead)  # not claimed: no outcome yet

    # The documents' own runs find the chunks extracted ahead and write every document; no chunk
    # was sent twice.
    rest = extract_documents(job.settings, ChunkExtractor(job.settings), job.doc_ids[BATCH:], claimant="run-2",
                             job_id=job.job_id)
    store = open_graph_store(job.settings)
    try:
        written = write_documents(job.settings, store, outcomes, claimant="run-1", job_id=job.job_id)
        written += write_documents(job.settings, store, rest, claimant="run-2", job_id=job.job_id)
    finally:
        store.close()
    assert {o.doc_id: o.status for o in written} == dict.fromkeys(job.doc_ids, "succeeded")
    called = _chunks_called(fake_llm)
    assert len(called) == len(set(called)) == DOCUMENTS * CHUNKS
    cached = {o.doc_id for o in rest if o.cached_chunks}
    assert cached and cached <= ahead  # served from the checkpoints made ahead


@pytest.mark.slow  # waits out the step's grace for the ahead lock: out of the fast step
def test_a_run_claiming_a_document_being_extracted_ahead_waits_for_it_and_pays_nothing_twice(
    job: AheadJob, fake_llm: FakeServer
) -> None:
    """No margin is left to the next runs: a run that claims a document while another step extracts
    it ahead waits until its chunks are settled and finds them checkpointed."""
    fake_llm.configure(latency_mean_s=1.0, latency_jitter_s=0.0)
    thread, outcomes = _extract_in_thread(job, job.doc_ids[:BATCH], "run-1")
    client = redis_client.connect(job.settings)
    # The job's last batch: in the group extracted ahead (all the later documents, in partition
    # order), its calls come last, about 2 s after the first. Its run claims it before that.
    last_run = job.doc_ids[-BATCH:]
    _wait(lambda: in_progress_ahead(client, job.job_id, last_run) == set(last_run), 30,
          "the last batch in progress ahead")
    extracted = extract_documents(job.settings, ChunkExtractor(job.settings), last_run, claimant="run-2",
                                  job_id=job.job_id, ahead_s=60)
    assert [(o.status, o.cached_chunks, o.llm_calls) for o in extracted] == [("extracted", CHUNKS, 0)] * BATCH
    assert not in_progress_ahead(client, job.job_id, last_run)
    with OwnExtraction(client, job.job_id, "run-3"):
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert [o.status for o in outcomes] == ["extracted"] * BATCH
    called = _chunks_called(fake_llm)
    assert len(called) == len(set(called))


@pytest.mark.slow  # waits out the step's grace for the ahead lock: out of the fast step
def test_no_step_extracts_ahead_while_another_extracts_its_own_batch(job: AheadJob, fake_llm: FakeServer) -> None:
    with OwnExtraction(redis_client.connect(job.settings), job.job_id, "run-2"):
        thread, outcomes = _extract_in_thread(job, job.doc_ids[:BATCH], "run-1")
        thread.join(timeout=20)
        assert not thread.is_alive()
    assert [o.status for o in outcomes] == ["extracted"] * BATCH
    assert len(_chunks_called(fake_llm)) == BATCH * CHUNKS and not _ahead_documents(job)


def test_a_cancelled_job_stops_extracting_ahead(job: AheadJob, fake_llm: FakeServer) -> None:
    thread, outcomes = _extract_in_thread(job, job.doc_ids[:BATCH], "run-1")
    _wait(lambda: len(_chunks_called(fake_llm)) > BATCH * CHUNKS + 2, 30, "calls for documents ahead")
    flag_cancelled(redis_client.connect(job.settings), job.job_id)
    thread.join(timeout=15)
    assert not thread.is_alive()
    calls = len(_chunks_called(fake_llm))
    time.sleep(1)
    assert len(_chunks_called(fake_llm)) == calls < DOCUMENTS * CHUNKS


def test_a_step_counts_as_extracting_its_own_batch_from_its_first_call_only(job: AheadJob) -> None:
    """While the next step loads its documents and looks up their checkpoints, the step extracting
    ahead goes on: it is handed over when the next one is about to call."""
    client = redis_client.connect(job.settings)
    with OwnExtraction(client, job.job_id, "run-2", lazy=True) as own:
        assert not others_extracting(client, job.job_id, "run-1")
        own.start()
        own.start()  # once
        assert others_extracting(client, job.job_id, "run-1")
    assert not others_extracting(client, job.job_id, "run-1")


@pytest.mark.slow  # waits out 2-s answers: out of the fast step
def test_a_step_handed_over_gives_up_the_ahead_lock_before_its_last_answers(
    job: AheadJob, fake_llm: FakeServer
) -> None:
    """The next step may extract ahead while the last calls of the one handed over are still out:
    waiting for their answers was a pause of one LLM latency in the job's calls."""
    fake_llm.configure(latency_mean_s=2.0, latency_jitter_s=0.0)
    thread, outcomes = _extract_in_thread(job, job.doc_ids[:BATCH], "run-1")
    _wait(lambda: len(_chunks_called(fake_llm)) > BATCH * CHUNKS + 2, 30, "calls for documents ahead")
    client = redis_client.connect(job.settings)
    with OwnExtraction(client, job.job_id, "run-2"):
        _wait(lambda: take_ahead_lock(client, job.job_id, "run-3"), 1.5, "the ahead lock given up")
        assert thread.is_alive()  # its last calls are still waiting for their answers
        thread.join(timeout=15)
        assert not thread.is_alive()
    assert client.get(ahead_lock_key(job.job_id)) == "run-3"  # run-1 ending did not take it from run-3
    assert [o.status for o in outcomes] == ["extracted"] * BATCH


@pytest.mark.slow  # seconds of real waiting: out of the fast step
def test_a_step_stops_extracting_ahead_when_redis_loses_the_jobs_ahead_lock(
    job: AheadJob, fake_llm: FakeServer
) -> None:
    """Redis restarted without its data forgets which documents were taken ahead: the step that was
    extracting ahead stops as if handed over, or another step could take its documents again."""
    thread, outcomes = _extract_in_thread(job, job.doc_ids[:BATCH], "run-1")
    _wait(lambda: len(_chunks_called(fake_llm)) > BATCH * CHUNKS + 2, 30, "calls for documents ahead")
    redis_client.connect(job.settings).flushdb()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert [o.status for o in outcomes] == ["extracted"] * BATCH
    calls = len(_chunks_called(fake_llm))
    time.sleep(1)
    assert len(_chunks_called(fake_llm)) == calls < DOCUMENTS * CHUNKS


@pytest.mark.slow  # seconds of real waiting: out of the fast step
def test_a_step_extracting_ahead_waits_for_the_documents_a_step_handed_over_gives_back(
    job: AheadJob, fake_llm: FakeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A step handed over gives the documents its group had not started back only when its calls in
    flight are answered. The step that extracts ahead next finds every document taken until then: it
    waits for them and takes them, instead of ending with the job's calls paused until a later run."""
    monkeypatch.setenv("LUMIKB_LLM_MAX_IN_FLIGHT", "8")  # the group's calls go out a few at a time
    settings = load_settings()
    fake_llm.configure(latency_mean_s=5.0, latency_jitter_s=0.0)  # answers out for seconds

    def extract(doc_ids: list[str], claimant: str) -> list[DocumentOutcome]:
        return extract_documents(settings, ChunkExtractor(settings), doc_ids, claimant=claimant, job_id=job.job_id,
                                 ahead_s=60)

    first: list[DocumentOutcome] = []
    thread = threading.Thread(target=lambda: first.extend(extract(job.doc_ids[:BATCH], "run-1")))
    thread.start()
    # Its own batch, then the documents ahead in partition order: the next batch's among the first.
    _wait(lambda: len(_chunks_called(fake_llm)) >= 2 * BATCH * CHUNKS + 4, 60, "calls for documents ahead")
    client = redis_client.connect(settings)
    with OwnExtraction(client, job.job_id, "run-2"):
        _wait(lambda: client.get(ahead_lock_key(job.job_id)) is None, 5, "the ahead lock given up")
    assert thread.is_alive()  # its group's last calls are still out, its other documents still taken
    with caplog.at_level("INFO", logger="lumikb_pipeline.pipeline.extract"):
        second = extract(job.doc_ids[BATCH:2 * BATCH], "run-3")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert [o.status for o in first + second] == ["extracted"] * 2 * BATCH
    called = _chunks_called(fake_llm)
    assert len(called) == len(set(called)) == DOCUMENTS * CHUNKS  # every document, each chunk once
    assert "for another step's groups to give back" in caplog.text  # and not by run-1 alone


@pytest.mark.slow  # seconds of real waiting: out of the fast step
def test_a_step_started_again_frees_at_once_what_it_held_ahead_when_its_process_died(
    job: AheadJob, fake_llm: FakeServer
) -> None:
    """A step's process killed while it extracts ahead leaves in Redis what a `SIGKILL` leaves: the
    job's ahead lock and the in-progress marks of the documents it took, which the runs that claim
    those documents wait for (up to `ACTIVE_TTL_S`, 30 s). The same step started again (Celery
    redelivers it, or its run's retry: the same claimant) frees them at once."""
    client = redis_client.connect(job.settings)
    # What run-1's killed process left: the lock, its registration, and the job's last documents
    # taken and marked, none of their chunks called.
    assert take_ahead_lock(client, job.job_id, "run-1")
    taken = pick_ahead(job.settings, client, job.job_id, "run-1", 1, 2 * BATCH * CHUNKS)
    assert sorted(taken) == sorted(job.doc_ids[-2 * BATCH:])
    client.zadd(extracting_key(job.job_id), {"run-1": time.time() + 30})
    last_run = job.doc_ids[-BATCH:]
    waiting, waited = _extract_in_thread(job, last_run, "run-9")  # the run of the job's last batch
    time.sleep(2)
    assert waiting.is_alive() and not _chunks_called(fake_llm)  # it waits for the marks

    # Another run's step extracts its own batch meanwhile, so neither step goes on ahead: each ends
    # with its own batch (after the grace for the ahead lock).
    with OwnExtraction(client, job.job_id, "run-2"):
        restarted = time.monotonic()
        thread, outcomes = _extract_in_thread(job, job.doc_ids[:BATCH], "run-1")
        _wait(lambda: len(_chunks_called(fake_llm)) >= 2 * BATCH * CHUNKS, 10,
              "the run of the last batch to call for its documents")
        assert time.monotonic() - restarted < 10  # not after the marks' 30 s
        assert not in_progress_ahead(client, job.job_id, taken)
        assert client.get(ahead_lock_key(job.job_id)) is None
        waiting.join(timeout=30)
        thread.join(timeout=30)
        assert not waiting.is_alive() and not thread.is_alive()
    assert [(o.status, o.llm_calls) for o in waited] == [("extracted", CHUNKS)] * BATCH  # it called them itself
    assert [o.status for o in outcomes] == ["extracted"] * BATCH
    assert not _ahead_documents(job) & set(taken)  # given back: a later step may take them ahead again
    called = _chunks_called(fake_llm)
    assert len(called) == len(set(called)) == 2 * BATCH * CHUNKS  # nothing paid twice
