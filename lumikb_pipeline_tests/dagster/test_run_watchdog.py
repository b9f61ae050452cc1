"""Dead runs free their slots (issue 12): a process running a batch of `document_entities` is killed
with SIGKILL in mid-extraction; the job-status sensor's watchdog fails its run and frees its pool
slot, and the reaper closes its ledger rows, so the job ends by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dagster import DagsterRunStatus, RunsFilter
from sqlalchemy import select

from lumikb_pipeline.core.config import get_settings, load_settings
from lumikb_pipeline.core.names import POOL_LLM, TAG_JOB_ID
from lumikb_pipeline.db import catalog, migrate
from lumikb_pipeline.db.models import ExtractionRecord, ExtractionStatus, Job, JobStatus
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_file
from lumikb_pipeline.infra.dagster_instance import apply_pool_limits, open_instance
from lumikb_pipeline.infra.run_watchdog import TAG_RUN_PID, fail_dead_runs
from lumikb_pipeline.reextraction.reaper import reap_abandoned_work
from lumikb_pipeline.reextraction.service import Selection, start_reextraction
from lumikb_pipeline_tests.fake_llm import FakeServer, start_fake_server, stop_fake_server

DEMO = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo"

RUN_BATCH = """
import sys
from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.orchestration.in_process import run_documents_in_process
run_documents_in_process(load_settings(), sys.argv[2:], job_id=sys.argv[1], schema_version=1, batch_size=100)
"""


@pytest.fixture
def slow_llm() -> Iterator[FakeServer]:
    server = start_fake_server("--latency-mean", "2")
    yield server
    stop_fake_server(server)


@pytest.fixture
def env(lumikb_env: Path, redis_url: str, slow_llm: FakeServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Embedded app database, graph store and Dagster instance; the test Redis; a slow LLM."""
    monkeypatch.setenv("LUMIKB_REDIS_URL", redis_url)
    monkeypatch.setenv("LUMIKB_LLM_MODEL", "openai/gpt-4o-mini")
    monkeypatch.setenv("LUMIKB_LLM_API_BASE", slow_llm.api_base)
    monkeypatch.setenv("LUMIKB_LLM_API_KEY", "sk-test")
    get_settings.cache_clear()
    return lumikb_env


def wait_for(what: str, condition: Callable[[], object], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow  # a real run process killed and waited out: out of the fast step
def test_a_killed_run_process_is_failed_its_slots_freed_and_its_job_ends(env: Path) -> None:
    settings = load_settings()
    migrate.ensure_database(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as session:
        catalog.create_kb(session, "demo", parse_schema_file(DEMO / "schema_v1.yaml"))
    assert not catalog.ingest(settings.effective_database_url, "demo", [DEMO / "corpus"]).errors
    job = start_reextraction(settings, "demo", Selection.all(), launch=False)
    with session_scope(settings.effective_database_url) as session:
        doc_ids = [r.document_id for r in session.scalars(select(ExtractionRecord).where(
            ExtractionRecord.job_id == job.id))]
    instance = open_instance(settings)
    apply_pool_limits(instance, settings)

    worker = subprocess.Popen(
        [sys.executable, "-c", RUN_BATCH, job.id, *doc_ids], env=dict(os.environ), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(env.parent / "run.log", "wb"),  # noqa: SIM115
    )

    def started_run() -> str | None:
        runs = instance.get_runs(RunsFilter(tags={TAG_JOB_ID: job.id}, statuses=[DagsterRunStatus.STARTED]))
        return runs[0].run_id if runs and TAG_RUN_PID in runs[0].tags else None

    def running_rows() -> int:
        with session_scope(settings.effective_database_url) as session:
            return len(list(session.scalars(select(ExtractionRecord.id).where(
                ExtractionRecord.job_id == job.id, ExtractionRecord.status == ExtractionStatus.RUNNING))))

    try:
        wait_for("the run to start, hold an LLM slot and claim its documents",
                 lambda: started_run() and instance.event_log_storage.get_concurrency_info(POOL_LLM).claimed_slots
                 and running_rows() == len(doc_ids))
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    run_id = started_run()
    assert run_id is not None
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED  # what Dagster alone leaves
    assert run_id in instance.event_log_storage.get_concurrency_run_ids()

    # One tick of the job-status sensor's watchdog and reaper.
    failed = fail_dead_runs(instance)
    reaped = reap_abandoned_work(settings, instance, grace_s=0)

    assert failed == [f"run {run_id}: failed, its process (pid {worker.pid} on {os.uname().nodename}) is gone"]
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
    assert run_id not in instance.event_log_storage.get_concurrency_run_ids()
    assert instance.event_log_storage.get_concurrency_info(POOL_LLM).claimed_slots == []
    assert reaped and "abandoned document(s) marked failed" in reaped[0]
    assert running_rows() == 0
    with session_scope(settings.effective_database_url) as session:
        closed = session.get_one(Job, job.id)
        rows = list(session.scalars(select(ExtractionRecord).where(ExtractionRecord.job_id == job.id)))
    assert closed.status == JobStatus.FAILED and closed.finished_at is not None
    assert all(r.status == ExtractionStatus.FAILED and "abandoned" in (r.last_error or "") for r in rows)
