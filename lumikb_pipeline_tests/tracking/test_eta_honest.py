"""The ETA is honest while it matters: a re-extraction job run as real Dagster runs (in this process)
against the fake LLM server with latency, its progress read every half second as `lumikb progress
--json` reads it. From a quarter of the job on, the ETA is within 30% of the time actually left and
the rate within 30% of the rate the job then achieved."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis

from lumikb_pipeline.core.config import get_settings, load_settings
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.reextraction.service import Selection, start_reextraction
from lumikb_pipeline.tracking.progress import job_progress
from lumikb_pipeline_tests.fake_llm import FakeServer
from lumikb_pipeline_tests.tracking.conftest import reports_kb

DOCUMENTS = 144
BATCH = 6
TOLERANCE = 0.30
# A run writes its batch at once, so time left is known to about a second (the checks allow that
# much besides the 30%); once only three batches remain "time left" is the batch rhythm (a batch
# landing at once, then the next a second and a half later) rather than a pace, so the samples
# checked stop there.
SLACK_S = 1.0


@pytest.fixture
def documents(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str, redis_url: str, fake_llm: FakeServer
) -> Iterator[list[str]]:
    """A KB `eta` of the reports; the fake LLM answers in 0.25 s (± 0.1 s); runs in a temporary Dagster home."""
    fake_llm.configure(latency_mean_s=0.25, latency_jitter_s=0.1)
    yield reports_kb(monkeypatch, tmp_path, slug="eta", documents=DOCUMENTS, database_url=pg_url,
                     redis_url=redis_url, llm=fake_llm, rate_limit="10/s", DAGSTER_HOME=str(tmp_path / "dagster"))
    get_settings.cache_clear()


# Timing-based and about a minute long: in the slow step, on the quieter machine after the fast tests.
@pytest.mark.slow
def test_from_a_quarter_on_eta_and_rate_are_within_30_percent(documents: list[str], redis_url: str) -> None:
    from lumikb_pipeline.orchestration.in_process import run_documents_in_process

    settings = load_settings()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job = start_reextraction(settings, "eta", Selection.outdated(), launch=False)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_documents_in_process(
                settings, documents, job_id=job.id, schema_version=job.target_schema_version, batch_size=BATCH
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    samples: list[tuple[float, dict[str, object]]] = []
    while worker.is_alive():
        with session_scope(settings.effective_database_url) as session:
            samples.append((time.time(), job_progress(session, client, job.id).contract_json()))
        time.sleep(0.5)
    worker.join()
    assert errors == []
    with session_scope(settings.effective_database_url) as session:
        final = job_progress(session, client, job.id)
    assert final.status == "succeeded" and final.completed == DOCUMENTS
    assert final.completed + final.failed + final.cancelled + final.remaining == final.total
    assert final.updated_at is not None
    ended = datetime.fromisoformat(final.updated_at).timestamp()

    checked, report = 0, []
    for at, sample in samples:
        done = int(sample["completed"]) + int(sample["failed"])  # type: ignore[call-overload]
        if sample["rate_per_s"] is None:
            assert done < DOCUMENTS // 4, f"no rate at {done} of {DOCUMENTS} documents"
            continue
        if not DOCUMENTS // 4 <= done < DOCUMENTS - 3 * BATCH:
            continue
        left = ended - at
        achieved = (DOCUMENTS - done) / left
        eta, rate = float(sample["eta_seconds"]), float(sample["rate_per_s"])  # type: ignore[arg-type]
        report.append(f"{done:3d} done: ETA {eta:5.1f}s vs {left:5.1f}s left, rate {rate:.2f} vs {achieved:.2f}/s")
        assert abs(eta - left) <= TOLERANCE * left + SLACK_S, "\n".join(report)
        assert abs(rate - achieved) <= TOLERANCE * achieved + SLACK_S / left * achieved, "\n".join(report)
        checked += 1
    assert checked >= 10, f"only {checked} samples from a quarter on:\n" + "\n".join(report)
    print("\n".join(report))

    # The same figures in each materialization's metadata (what the Dagster UI shows per document).
    from dagster import AssetKey

    from lumikb_pipeline.infra.dagster_instance import open_instance

    events = open_instance(settings).fetch_materializations(AssetKey("document_entities"), limit=1000).records
    assert len(events) == DOCUMENTS
    in_metadata = 0
    for record in events:
        metadata = record.asset_materialization.metadata if record.asset_materialization else {}
        assert metadata["job_id"].value == job.id
        done = int(str(metadata["job_documents_done"].value).split(" of ")[0])
        if not DOCUMENTS // 4 <= done < DOCUMENTS - 3 * BATCH:
            continue
        left = ended - record.timestamp
        eta = float(metadata["job_eta_seconds"].value)  # type: ignore[arg-type]
        assert abs(eta - left) <= TOLERANCE * left + SLACK_S, (done, eta, left)
        in_metadata += 1
    assert in_metadata >= DOCUMENTS // 2
