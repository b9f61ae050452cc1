"""`document_entities` in this process with the real processing code, the real graph store and an
LLM: each document materialized on its own, one failure does not fail the others, and a re-execution
from failure redoes only the failed document."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dagster import AssetKey, DagsterInstance, ReexecutionOptions, execute_job, reconstructable

from lumikb_pipeline.db import catalog
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_file
from lumikb_pipeline_tests.conftest import required_env
from lumikb_pipeline_tests.dagster.helpers import (
    SCHEMA_V1,
    document_text,
    ledger_rows,
    partition_keys,
    partition_status,
    unique_slug,
)


@pytest.fixture
def fake_llm(tmp_path: Path) -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "lumikb_pipeline_tests.dagster.faulty_llm", "--port", "0"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "llm.log", "wb"),  # noqa: SIM115
    )
    assert process.stdout is not None
    url = process.stdout.readline().decode().strip().removeprefix("listening on ")
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def env(pg_url: str, redis_url: str, fake_llm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from lumikb_pipeline.core.config import get_settings

    for name in list(os.environ):
        if name.startswith("LUMIKB_") and not name.startswith("LUMIKB_NEO4J"):
            monkeypatch.delenv(name)
    required_env("LUMIKB_NEO4J_URI")
    monkeypatch.delenv("LUMIKB_DAGSTER_PG_URL", raising=False)
    monkeypatch.setenv("LUMIKB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("LUMIKB_DATABASE_URL", pg_url)
    monkeypatch.setenv("LUMIKB_REDIS_URL", redis_url)
    monkeypatch.setenv("LUMIKB_LLM_MODEL", "openai/gpt-4o-mini")
    monkeypatch.setenv("LUMIKB_LLM_API_BASE", f"{fake_llm}/v1")
    monkeypatch.setenv("LUMIKB_LLM_API_KEY", "sk-test")
    monkeypatch.setenv("LUMIKB_LLM_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("LUMIKB_LLM_RETRY_WINDOW_S", "0")  # the poisoned document fails after its attempts
    monkeypatch.setenv("LUMIKB_LLM_RATE_LIMIT", "25/s")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _documents(tmp_path: Path, markers: dict[int, str]) -> list[str]:
    from lumikb_pipeline.core.config import get_settings

    url = get_settings().effective_database_url
    slug = unique_slug("inproc")
    with session_scope(url) as session:
        catalog.create_kb(session, slug, parse_schema_file(SCHEMA_V1))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"d{i}.txt").write_text(document_text("ip", i, markers.get(i, "")))
    return list(catalog.ingest(url, slug, [folder]).document_ids)


def test_each_document_is_materialized_with_its_metadata_and_a_failed_one_alone_fails(
    env: Path, fake_llm: str
) -> None:
    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.orchestration.in_process import in_process_job, run_documents_in_process

    ids = _documents(env, {2: "Quarantineword"})
    httpx.post(f"{fake_llm}/_poison", json={"marker": "Quarantineword", "times": -1})
    settings = get_settings()
    (env / "instance").mkdir()
    with DagsterInstance.local_temp(str(env / "instance")) as instance:
        [run] = run_documents_in_process(settings, ids, instance=instance)
        assert not run.success and run.doc_ids == tuple(ids) and run.partition_keys == tuple(partition_keys(ids))

        good = [doc_id for i, doc_id in enumerate(ids) if i != 2]
        materialized, failed = partition_status(instance)
        assert materialized == set(good) and failed == {ids[2]}
        record = instance.fetch_materializations(AssetKey("document_entities"), limit=1).records[0]
        metadata = {key: value.value for key, value in record.asset_materialization.metadata.items()}
        assert {"schema_version", "entities", "relationships", "llm_calls", "cached_chunks", "duration_s"} <= set(
            metadata)
        assert metadata["schema_version"] == 1 and metadata["entities"] > 0 and metadata["llm_calls"] == 1
        # The partition is the document's readable key; the metadata names the document.
        doc_id = metadata["document_id"]
        assert record.partition_key == partition_keys([doc_id])[0]
        assert record.partition_key.startswith(f"{metadata['kb']}/d{ids.index(doc_id)}-")
        assert metadata["title"] == f"d{ids.index(doc_id)}" and str(metadata["source"]).endswith(".txt")
        rows = ledger_rows(ids, 1)
        assert rows[ids[2]].status.value == "failed" and rows[ids[2]].last_error

        # The provider recovers; re-executing from failure redoes the failed document only.
        httpx.post(f"{fake_llm}/_poison", json={"marker": None})
        calls_before = len(httpx.get(f"{fake_llm}/_calls").json()["calls"])
        parent = instance.get_run_by_id(run.run_id)
        assert parent is not None
        with execute_job(
            reconstructable(in_process_job), instance, tags=parent.tags,
            reexecution_options=ReexecutionOptions.from_failure(run.run_id, instance),
        ) as retry:
            assert retry.success
        assert len(httpx.get(f"{fake_llm}/_calls").json()["calls"]) - calls_before == 1
        rows = ledger_rows(ids, 1)
        assert all(row.status.value == "succeeded" for row in rows.values())
        assert all(rows[doc_id].attempts == 1 for doc_id in good)
        materialized, failed = partition_status(instance)
        assert materialized == set(ids) and not failed


def test_a_run_of_a_ui_backfill_records_and_works_for_the_backfills_job(env: Path) -> None:
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
    from sqlalchemy import select

    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.db.models import Job
    from lumikb_pipeline.orchestration.in_process import in_process_job
    from lumikb_pipeline_tests.dagster.test_sensors import _ui_backfill

    ids = _documents(env, {})
    (env / "instance").mkdir()
    with DagsterInstance.local_temp(str(env / "instance")) as instance:
        keys = partition_keys(ids)
        instance.add_dynamic_partitions("documents", keys)
        _ui_backfill(instance, "uibackfillrun", ids)
        tags = {"dagster/backfill": "uibackfillrun", ASSET_PARTITION_RANGE_START_TAG: keys[0],
                ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
        with execute_job(reconstructable(in_process_job), instance, tags=tags) as result:
            assert result.success
        with session_scope(get_settings().effective_database_url) as session:
            [job] = session.scalars(select(Job)).all()
            assert (job.trigger.value, job.dagster_backfill_id, job.total_documents) == (
                "ui-backfill", "uibackfillrun", 4)
            assert job.status.value == "succeeded"  # its last document's write closed it
        rows = ledger_rows(ids, 1)
        assert {row.job_id for row in rows.values()} == {job.id}
        assert all(row.status.value == "succeeded" for row in rows.values())
        record = instance.fetch_materializations(AssetKey("document_entities"), limit=1).records[0]
        assert record.asset_materialization.metadata["job_id"].value == job.id
