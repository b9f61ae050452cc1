"""The deployment end to end, as real processes (`stack`): PostgreSQL-backed Dagster with its daemon,
webserver and code server, real Celery workers per queue, Redis, Neo4j and the fake LLM server.

The tests run in file order and build on each other's data (one stack for all: starting it costs
more than most tests). `LUMIKB_TEST_REUSE_STACK=<json>` runs them against a stack left running.
"""

import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest
from dagster import AssetKey, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import SCHEDULE_NAME_TAG, SCHEDULED_EXECUTION_TIME_TAG
from sqlalchemy import select

from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.models import Job, JobStatus, JobTrigger
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.orchestration import processes
from lumikb_pipeline_tests.conftest import required_env
from lumikb_pipeline_tests.dagster.helpers import (
    EXTRACT_STEP,
    SCHEMA_V1,
    SCHEMA_V2,
    WRITE_STEP,
    celery_workers,
    create_kb,
    database_url,
    documents_of,
    failed_runs_report,
    ingest,
    ingest_as_extracted,
    ingest_at_once,
    ledger_counts,
    ledger_rows,
    materialized_partitions,
    max_overlap,
    partition_keys,
    partition_status,
    set_schema,
    step_intervals,
    steps_in_progress,
    submitted_queues,
    unique_slug,
    write_documents,
)
from lumikb_pipeline_tests.dagster.stack import POOL_LIMITS, Stack, wait_until

pytestmark = pytest.mark.slow

STATE: dict[str, Any] = {}
SCHEMA_SENSOR = {"repositoryLocationName": "lumikb_pipeline", "repositoryName": "__repository__",
                 "sensorName": "schema_version_sensor"}
SET_SENSOR_CURSOR = """
mutation Cursor($selector: SensorSelector!, $cursor: String) {
  setSensorCursor(sensorSelector: $selector, cursor: $cursor) { __typename ... on PythonError { message } }
}
"""
START_SENSOR = """
mutation Start($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) { __typename ... on PythonError { message } }
}
"""


@pytest.fixture(scope="module", autouse=True)
def _leave_the_stack_as_found(stack: Stack) -> Any:
    """The stack outlives this module (it is the package's): what the tests here change in it is
    put back at the end. The schema-version sensor (stopped by test 4) runs again, with every KB's
    current version as handled (the versions these tests set while it was stopped start no job in
    later modules), and the drift check goes back to its default cron (test 6 set one per minute)."""
    yield
    from lumikb_pipeline.db.models import KnowledgeBase

    with session_scope(database_url()) as session:
        versions = {str(kb_id): version for kb_id, version in
                    session.execute(select(KnowledgeBase.id, KnowledgeBase.current_schema_version))}
    cursor = stack.graphql(SET_SENSOR_CURSOR, {"selector": SCHEMA_SENSOR,
                                               "cursor": json.dumps(versions, sort_keys=True)})
    assert cursor["setSensorCursor"]["__typename"] == "Sensor", cursor
    started = stack.graphql(START_SENSOR, {"selector": SCHEMA_SENSOR})
    assert started["startSensor"]["__typename"] == "Sensor", started
    reset = stack.lumikb("schedule", "set-cron", "0 2 * * *")
    assert reset.returncode == 0, reset.stderr


def _neo4j_pid() -> int:
    """The Neo4j server of the test services: the process listening on the Bolt port."""
    port = urlparse(required_env("LUMIKB_NEO4J_URI")).port
    assert port is not None
    [pid] = processes.listening_pids(port) or set()
    return pid


def _within(seconds: float, condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds within `seconds` (polled every half second)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _say(message: str) -> None:
    print(f"\n[e2e] {message}", flush=True)


def _runs_of_backfill(instance: Any, backfill_id: str) -> list[Any]:
    return list(instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id})))


def _assert_on_queue(instance: Any, run_ids: list[str], queue: str) -> None:
    for run_id in run_ids:
        queues = submitted_queues(instance, run_id)
        workers = celery_workers(instance, run_id)
        assert set(queues) == {queue}, (run_id, queues)
        assert workers and all(name.startswith(f"{queue}@") for name in workers), (run_id, workers)


def _sensor_job(slug: str, version: int) -> Job | None:
    """The sensor's job for a KB version, once its backfill is launched."""
    with session_scope(database_url()) as session:
        job = session.scalar(select(Job).where(Job.dedupe_key == f"sensor:{slug}:{version}"))
        if job is None or not job.dagster_backfill_id:
            return None
        session.expunge(job)
        return job


# --------------------------------------------------------------------------- 6 (first half)


def test_set_cron_is_taken_by_the_running_daemon(stack: Stack) -> None:
    STATE["daemon_pid"] = stack.processes["daemon"].pid if stack.processes else None
    bad = stack.lumikb("schedule", "set-cron", "61 * * * *")
    assert bad.returncode == 2 and "is not a cron expression" in bad.stderr and "e.g. '0 2 * * *'" in bad.stderr
    shown = stack.lumikb("schedule", "show")
    assert shown.returncode == 0 and "'0 2 * * *'" in shown.stdout
    result = stack.lumikb("schedule", "set-cron", "*/1 * * * *")
    assert result.returncode == 0, result.stderr
    assert "'*/1 * * * *'" in result.stdout
    STATE["cron_set_at"] = datetime.now(UTC)


# --------------------------------------------------------------------------- 1


def test_ingested_documents_become_partitions_extracted_on_document_processing(stack: Stack, tmp_path: Path) -> None:
    slug = unique_slug("t1")
    create_kb(slug)
    write_documents(tmp_path / "docs", slug.replace("-", ""), 200)
    started = time.monotonic()
    ids = ingest(slug, tmp_path / "docs")
    assert len(ids) == 200
    wait_until(lambda: ledger_counts(slug)[(1, "succeeded")] == 200, 420, 2, "200 documents extracted")
    elapsed = time.monotonic() - started
    _say(f"200 documents ingested -> extracted on document_processing in {elapsed:.0f}s")

    instance = stack.instance()
    keys = partition_keys(ids)
    assert all(key.startswith(f"{slug}/") for key in keys)  # readable: KB slug, title, short id

    def finished_runs() -> list[Any]:
        runs = [
            run for run in instance.get_runs(RunsFilter(job_name="document_processing_job"))
            if run.tags.get("dagster/asset_partition_range_start") in keys
        ]
        return runs if runs and all(run.is_finished for run in runs) else []

    runs = wait_until(finished_runs, 60, 1, "the runs to finish")
    assert all(run.status == DagsterRunStatus.SUCCESS for run in runs)
    assert set(keys) <= set(instance.get_dynamic_partitions("documents"))
    assert set(ids) <= materialized_partitions(instance)
    _assert_on_queue(instance, [run.run_id for run in runs], "document_processing")
    reprocessing_steps = sum(celery_workers(instance, run.run_id)[name] for run in runs
                             for name in celery_workers(instance, run.run_id) if name.startswith("reprocessing@"))
    assert reprocessing_steps == 0
    STATE.update(kb1=slug, kb1_ids=ids, t1_seconds=elapsed, t1_runs=len(runs))


# --------------------------------------------------------------------------- 2


def test_schema_change_reextracts_exactly_the_outdated_documents_on_reprocessing(stack: Stack) -> None:
    slug, ids = STATE["kb1"], STATE["kb1_ids"]
    started = time.monotonic()
    assert set_schema(slug, SCHEMA_V2) == 2
    job = wait_until(lambda: _sensor_job(slug, 2), 60, 1, "the sensor's job")
    assert job.trigger == JobTrigger.SENSOR and job.total_documents == 200 and job.target_schema_version == 2
    wait_until(lambda: (_sensor_job(slug, 2) or job).status == JobStatus.SUCCEEDED, 480, 3, "the job to succeed")
    elapsed = time.monotonic() - started
    assert ledger_counts(slug)[(2, "succeeded")] == 200
    assert all(row.status.value == "succeeded" and row.job_id == job.id for row in ledger_rows(ids, 2).values())

    instance = stack.instance()
    backfill = instance.get_backfill(job.dagster_backfill_id)
    assert backfill is not None and backfill.tags["lumikb/job_id"] == job.id
    targeted = set(backfill.asset_backfill_data.target_subset.get_partitions_subset(
        AssetKey("document_entities")).get_partition_keys())
    assert targeted == set(partition_keys(ids))  # exactly the outdated documents
    runs = _runs_of_backfill(instance, backfill.backfill_id)
    originals = [run for run in runs if not run.parent_run_id]
    assert len(originals) == math.ceil(200 / 40)  # batched (LUMIKB_REEXTRACT_BATCH_SIZE=40), consecutive partitions
    _assert_on_queue(instance, [run.run_id for run in runs], "reprocessing")
    _say(f"schema change -> 200 documents re-extracted on reprocessing in {len(originals)} runs, {elapsed:.0f}s")

    # Later ticks start nothing (cursor + unique dedupe key).
    backfills_before = len(instance.get_backfills())
    time.sleep(12)
    with session_scope(database_url()) as session:
        jobs = session.scalars(select(Job).where(Job.kb_id == job.kb_id)).all()
    assert len(jobs) == 1
    assert len(instance.get_backfills()) == backfills_before
    STATE.update(t2_seconds=elapsed, t2_runs=len(originals))


# --------------------------------------------------------------------------- 4


def test_a_failing_document_fails_alone_and_a_retry_from_failure_repairs_only_it(stack: Stack, tmp_path: Path) -> None:
    slug = unique_slug("t4")
    marker = f"Poisonword{slug.replace('-', '')}"
    create_kb(slug)
    write_documents(tmp_path / "docs", slug.replace("-", ""), 6, markers={3: marker})
    ids = ingest(slug, tmp_path / "docs")
    wait_until(lambda: ledger_counts(slug)[(1, "succeeded")] == 6, 240, 2, "6 documents extracted")
    bad, good = ids[3], [doc_id for i, doc_id in enumerate(ids) if i != 3]

    stack.poison(marker, times=-1)  # 500 for every request of that document, every time
    assert set_schema(slug, SCHEMA_V2) == 2
    job = wait_until(lambda: _sensor_job(slug, 2), 60, 1, "the sensor's job")
    instance = stack.instance()

    def all_attempts_failed() -> bool:
        runs = _runs_of_backfill(instance, job.dagster_backfill_id)
        return len(runs) == 3 and all(run.status == DagsterRunStatus.FAILURE for run in runs)

    wait_until(all_attempts_failed, 420, 3, "the run and its 2 automatic retries to fail")
    runs = sorted(_runs_of_backfill(instance, job.dagster_backfill_id), key=lambda r: instance.get_run_record_by_id(
        r.run_id).create_timestamp)
    first, retries = runs[0], runs[1:]
    assert all(run.tags.get("dagster/retry_strategy") == "FROM_FAILURE" or run.parent_run_id for run in retries)

    # The others of the batch were written and materialized by the first run; the bad one failed.
    rows = ledger_rows(ids, 2)
    assert all(rows[doc_id].status.value == "succeeded" and rows[doc_id].attempts == 1 for doc_id in good)
    assert rows[bad].status.value == "failed" and rows[bad].last_error
    materialized, failed = partition_status(instance)
    assert bad in failed and not (set(good) & failed)
    assert set(good) <= materialized
    observed = [
        record for record in instance.all_logs(first.run_id)
        if record.dagster_event and record.dagster_event.event_type_value == "ASSET_OBSERVATION"
    ]
    assert [r.dagster_event.asset_observation_data.asset_observation.partition for r in observed] == partition_keys(
        [bad])
    failure = [r for r in instance.all_logs(first.run_id) if r.dagster_event_type
               and r.dagster_event_type.value == "STEP_FAILURE"]
    assert failure and bad in (failure[0].dagster_event.step_failure_data.user_failure_data.description or "")
    for retry in retries:  # the automatic retries redid nothing but the bad document
        assert reused_in(instance, retry.run_id) == set(good)
        assert materialized_in(instance, retry.run_id) == set(good)

    # Repair: the provider recovers, an admin re-executes the last run from failure (as the UI does).
    stack.poison(None)
    calls_before = len(stack.llm_calls())
    data = stack.graphql(REEXECUTE, {"reexecutionParams": {"parentRunId": runs[-1].run_id, "strategy": "FROM_FAILURE"}})
    result = data["launchPipelineReexecution"]
    assert result["__typename"] == "LaunchRunSuccess", result
    repair_id = result["run"]["runId"]
    wait_until(lambda: instance.get_run_by_id(repair_id).status == DagsterRunStatus.SUCCESS, 240, 2, "the repair run")
    assert materialized_in(instance, repair_id) == set(ids)
    assert reused_in(instance, repair_id) == set(good)  # reported current, not redone
    rows = ledger_rows(ids, 2)
    assert all(row.status.value == "succeeded" for row in rows.values())
    assert all(rows[doc_id].attempts == 1 for doc_id in good)  # the rest was not redone
    assert len(stack.llm_calls()) - calls_before == 1  # one chunk: the bad document's
    materialized, failed = partition_status(instance)
    assert bad in materialized and bad not in failed


REEXECUTE = """
mutation Reexecute($reexecutionParams: ReexecutionParams) {
  launchPipelineReexecution(reexecutionParams: $reexecutionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
    ... on RunConflict { message }
    ... on ConflictingExecutionParamsError { message }
    ... on NoModeProvidedError { message }
    ... on PresetNotFoundError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""


def reused_in(instance: Any, run_id: str) -> set[str]:
    """Documents (ids) a run reported current without redoing them (`reused: true`)."""
    return documents_of({
        record.dagster_event.materialization.partition
        for record in instance.all_logs(run_id)
        if record.dagster_event and record.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
        and record.dagster_event.materialization.metadata["reused"].value
    })


def materialized_in(instance: Any, run_id: str) -> set[str]:
    """Documents (ids) a run materialized."""
    return documents_of({
        record.dagster_event.materialization.partition
        for record in instance.all_logs(run_id)
        if record.dagster_event and record.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
    })


# --------------------------------------------------------------------------- 7


SENSOR_STATE = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { id sensorState { id status selectorId } }
  }
}
"""
STOP_SENSOR = """
mutation Stop($id: String!) {
  stopSensor(id: $id) { __typename }
}
"""
LAUNCH_BACKFILL = """
mutation Launch($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on UnauthorizedError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey }
    ... on PartitionSetNotFoundError { message }
    ... on RunConflict { message }
    ... on ConflictingExecutionParamsError { message }
  }
}
"""


def _stop_sensor(stack: Stack, selector: dict[str, str]) -> None:
    """Stop a sensor as an admin does, and look again until it has stayed stopped. Dagster's sensor
    daemon writes the state it read at a tick's start back at the tick's end
    (`dagster/_daemon/sensor.py`: `update_instigator_state(state.with_data(...))`), so a stop that
    lands while a tick runs is undone (docs/dagster.md)."""
    confirmed = 0
    deadline = time.monotonic() + 120
    while confirmed < 2:
        assert time.monotonic() < deadline, "the sensor did not stay stopped"
        sensor = stack.graphql(SENSOR_STATE, {"selector": selector})["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        if sensor["sensorState"]["status"] == "STOPPED":
            confirmed += 1
        else:
            confirmed = 0
            stopped = stack.graphql(STOP_SENSOR, {"id": sensor["id"]})
            assert stopped["stopSensor"]["__typename"] == "StopSensorMutationResult", stopped
        time.sleep(8)  # longer than a tick of the 3-s sensor takes here


@pytest.mark.timeout(1500)  # 50 non-adjacent partitions are 50 runs: Dagster runs ranges only
def test_a_backfill_launched_like_the_ui_does_over_non_adjacent_partitions_completes_on_reprocessing(
    stack: Stack,
) -> None:
    slug, ids = STATE["kb1"], STATE["kb1_ids"]
    _stop_sensor(stack, SCHEMA_SENSOR)
    assert set_schema(slug, SCHEMA_V1) == 3  # every document outdated; the paused sensor starts nothing

    instance = stack.instance()
    keys = set(partition_keys(ids))
    order = [key for key in instance.get_dynamic_partitions("documents") if key in keys]
    chosen_keys = order[::4][:50]
    assert len(chosen_keys) == 50
    chosen = documents_of(chosen_keys)
    started = time.monotonic()
    launched = stack.graphql(LAUNCH_BACKFILL, {"backfillParams": {
        "partitionNames": chosen_keys,
        "assetSelection": [{"path": ["document_entities"]}],
        "title": "test: 50 non-adjacent documents",
    }})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def done() -> bool:
        backfill = instance.get_backfill(backfill_id)
        return backfill is not None and backfill.status.value.startswith("COMPLETED")

    wait_until(done, 1400, 3, "the backfill to complete")
    elapsed = time.monotonic() - started
    runs = _runs_of_backfill(instance, backfill_id)
    status = instance.get_backfill(backfill_id).status.value
    assert status == "COMPLETED_SUCCESS", (status, failed_runs_report(instance, runs))
    # The stopped sensor started nothing, not even a tick that was in flight when it was stopped.
    assert _sensor_job(slug, 3) is None
    counts = ledger_counts(slug)
    assert counts[(3, "succeeded")] == 50
    rows = ledger_rows(ids, 3)
    assert set(rows) == set(chosen) and all(row.status.value == "succeeded" for row in rows.values())
    _assert_on_queue(instance, [run.run_id for run in runs], "reprocessing")
    assert set().union(*(materialized_in(instance, run.run_id) for run in runs)) == set(chosen)
    # The backfill has its job (trigger ui-backfill), which owns the ledger rows and reports progress
    # under the backfill id the UI shows.
    with session_scope(database_url()) as session:
        [job] = session.scalars(select(Job).where(Job.dagster_backfill_id == backfill_id)).all()
        job_rows = ledger.status_counts(session, job.id)
    materialized_jobs = {
        record.asset_materialization.metadata.get("job_id").value  # type: ignore[union-attr]
        if record.asset_materialization.metadata.get("job_id") else None
        for record in instance.fetch_materializations(AssetKey("document_entities"), limit=200).records
        if record.run_id in {run.run_id for run in runs}
    }
    diagnosis = (job.status.value, {k.value: v for k, v in job_rows.items() if v}, materialized_jobs,
                 {row.job_id for row in rows.values()})
    assert (job.trigger.value, job.total_documents) == ("ui-backfill", 50), diagnosis
    assert {row.job_id for row in rows.values()} == {job.id}, diagnosis
    assert materialized_jobs == {job.id}, diagnosis
    assert job.status.value == "succeeded", diagnosis
    shown = stack.lumikb("progress", backfill_id, "--json")
    assert shown.returncode == 0, shown.stderr
    progress = json.loads(shown.stdout)
    assert (progress["job_id"], progress["completed"], progress["remaining"]) == (job.id, 50, 0)
    _say(f"UI backfill over 50 non-adjacent partitions: {len(runs)} runs on reprocessing, {elapsed:.0f}s")
    STATE.update(t7_seconds=elapsed, t7_runs=len(runs))


# --------------------------------------------------------------------------- 3


def test_a_new_document_is_extracted_within_60s_while_a_big_reextraction_fills_reprocessing(
    stack: Stack, tmp_path: Path
) -> None:
    big = unique_slug("t3big")
    create_kb(big)
    big_ids = ingest_as_extracted(big, write_documents(tmp_path / "big", big.replace("-", ""), 500))
    set_schema(big, SCHEMA_V2)  # the schema sensor is paused (previous test): the CLI starts the job
    instance = stack.instance()
    big_keys = set(partition_keys(big_ids))
    wait_until(lambda: big_keys <= set(instance.get_dynamic_partitions("documents")), 120, 2, "partitions")
    result = stack.lumikb("reextract", big, "--outdated")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    with session_scope(database_url()) as session:
        job = session.get_one(Job, job_id)
        assert job.total_documents == 500 and job.trigger == JobTrigger.CLI
        backfill_id = job.dagster_backfill_id
    assert backfill_id

    def reprocessing_busy() -> bool:
        runs = _runs_of_backfill(instance, backfill_id)
        return sum(run.status == DagsterRunStatus.STARTED for run in runs) >= 2

    wait_until(reprocessing_busy, 180, 1, "re-extraction runs to fill reprocessing")
    small = unique_slug("t3new")
    create_kb(small)
    write_documents(tmp_path / "new", small.replace("-", ""), 1)
    started = time.monotonic()
    (new_id,) = ingest(small, tmp_path / "new")
    wait_until(lambda: ledger_counts(small)[(1, "succeeded")] == 1, 60, 0.5, "the new document within 60 s")
    latency = time.monotonic() - started
    remaining = ledger_counts(big)[(2, "pending")] + ledger_counts(big)[(2, "running")]
    _say(f"new document extracted in {latency:.1f}s while {remaining} of 500 re-extractions were still to do")
    assert remaining > 0  # the re-extraction was still filling reprocessing
    run = next(r for r in instance.get_runs(RunsFilter(job_name="document_processing_job"))
               if r.tags.get("dagster/asset_partition_range_start") == partition_keys([new_id])[0])
    _assert_on_queue(instance, [run.run_id], "document_processing")
    STATE.update(t3_latency=latency, t3_job=job_id)
    # Stop the rest of the re-extraction (as the UI's "cancel backfill" does) to free the stack.
    stack.graphql("mutation C($id: String!) { cancelPartitionBackfill(backfillId: $id) { __typename } }",
                  {"id": backfill_id})


# --------------------------------------------------------------------------- 5


def test_pool_limits_held_in_every_run(stack: Stack, tmp_path: Path) -> None:
    instance = stack.instance()
    # Contention on purpose: 160 new documents in one transaction are 4 runs of 40 that start
    # together, on a worker that could run 4 steps at once. The LLM holds every request until 3
    # extract steps are in progress and the 4th waits for a slot of the pool (not for the worker);
    # released, the 3 end together, so their write steps want the graph-write slots at once too.
    # First the cancelled re-extraction of test 3 winds down: its runs end, and their steps stop too
    # (a step notices that its run was cancelled), so held LLM calls below are this test's only.
    def wound_down() -> bool:
        runs = list(instance.get_runs(RunsFilter(tags={"lumikb/job_id": STATE.get("t3_job", "")})))
        ids = [run.run_id for run in runs]
        return all(run.is_finished for run in runs) and not (
            steps_in_progress(instance, ids, EXTRACT_STEP) or steps_in_progress(instance, ids, WRITE_STEP))

    wait_until(wound_down, 180, 2, "the cancelled re-extraction to wind down")
    slug = unique_slug("t5")
    create_kb(slug)
    paths = write_documents(tmp_path / "docs", slug.replace("-", ""), 160)
    stack.hold_llm(True)
    try:
        started = time.monotonic()
        keys = set(partition_keys(ingest_at_once(slug, paths)))

        def extracting() -> int:
            runs = [run.run_id for run in instance.get_runs(RunsFilter(job_name="document_processing_job"))
                    if run.tags.get("dagster/asset_partition_range_start") in keys]
            return steps_in_progress(instance, runs, EXTRACT_STEP)

        wait_until(lambda: extracting() >= 3, 180, 1, "3 extract steps in progress")

        def fourth_step_waits() -> bool:
            # The 4th run's extract step is launched (its run process may take a while to start on a
            # busy machine) and asks the pool for a slot: it waits, or (a broken limit) it runs.
            return extracting() > 3 or instance.event_log_storage.get_concurrency_info(
                "lumikb_llm").pending_step_count >= 1

        wait_until(fourth_step_waits, 120, 1, "a 4th extract step asking for a lumikb_llm slot")
        time.sleep(2)  # time for it to start if the pool let it
        in_progress = extracting()
        info = instance.event_log_storage.get_concurrency_info("lumikb_llm")
        _say(f"held LLM: {in_progress} extract steps in progress, {stack.hold_llm()['waiting']} requests held, "
             f"{info.pending_step_count} step(s) waiting for a lumikb_llm slot")
        assert in_progress == 3 and info.pending_step_count >= 1
        # The graph-write pool the same way: Neo4j is stopped (SIGSTOP) before the 3 extract steps are
        # let go, so their write steps hold their slots, blocked on it, while the 4th run's step
        # extracts; its write step then asks for a slot too. Unblocked, writes of 1-2 s overlapped
        # only two at a time on a quick machine.
        graph = psutil.Process(_neo4j_pid())
        graph.suspend()
        try:
            stack.hold_llm(False)

            def writing() -> int:
                runs = [run.run_id for run in instance.get_runs(RunsFilter(job_name="document_processing_job"))
                        if run.tags.get("dagster/asset_partition_range_start") in keys]
                return steps_in_progress(instance, runs, WRITE_STEP)

            # The 3 extract steps first make their held and remaining LLM calls (3 x 40 at 25/s), then
            # their runs launch the write steps: on a loaded 2-vCPU machine that took over 20 s once.
            wait_until(lambda: writing() >= 3, 90, 0.5, "3 write steps in progress, blocked on Neo4j",
                       explain=lambda: f"extract steps in progress: {extracting()}, write steps: {writing()}")
            waiting_for_slot = _within(10, lambda: instance.event_log_storage.get_concurrency_info(
                "lumikb_graph_write").pending_step_count >= 1)
            _say(f"Neo4j stopped: {writing()} write steps in progress; a 4th waiting for a slot: {waiting_for_slot}")
        finally:
            graph.resume()
    finally:
        stack.hold_llm(False)
    wait_until(lambda: ledger_counts(slug)[(1, "succeeded")] == 160, 300, 2, "160 documents extracted")
    _say(f"160 documents in 4 contending runs extracted in {time.monotonic() - started:.0f}s")

    run_ids = [record.dagster_run.run_id for record in instance.get_run_records()]
    extract = step_intervals(instance, run_ids, EXTRACT_STEP)
    write = step_intervals(instance, run_ids, WRITE_STEP)
    peaks = {"lumikb_llm": max_overlap(extract), "lumikb_graph_write": max_overlap(write)}
    _say(f"pool peaks over {len(run_ids)} runs ({len(extract)} extract, {len(write)} write steps): {peaks}, "
         f"limits {POOL_LIMITS}")
    for pool, limit in POOL_LIMITS.items():
        assert instance.event_log_storage.get_concurrency_info(pool).slot_count == limit
        # Reached (more steps wanted to run than the pool has slots, so the limit was what held
        # them) and never exceeded, over every run of the module.
        assert peaks[pool] == limit, (pool, peaks[pool], limit)


# --------------------------------------------------------------------------- 6 (second half)


def test_the_drift_check_ran_every_minute_without_a_daemon_restart(stack: Stack) -> None:
    instance = stack.instance()
    set_at: datetime = STATE["cron_set_at"]

    def ticks() -> list[datetime]:
        # Runs of drift_check_schedule carry the tick's time (Dagster's scheduled-execution-time tag).
        runs = instance.get_runs(
            RunsFilter(job_name="drift_check_job", tags={SCHEDULE_NAME_TAG: "drift_check_schedule"})
        )
        return sorted(datetime.fromisoformat(run.tags[SCHEDULED_EXECUTION_TIME_TAG]) for run in runs
                      if SCHEDULED_EXECUTION_TIME_TAG in run.tags)

    found = wait_until(lambda: len(ticks()) >= 2 and ticks(), 150, 5, "two drift-check ticks")
    assert all(tick.second == 0 for tick in found)
    assert all((b - a).total_seconds() % 60 == 0 and b > a for a, b in zip(found, found[1:], strict=False))
    assert found[0] >= set_at.replace(second=0, microsecond=0)
    if STATE.get("daemon_pid"):
        assert stack.processes["daemon"].pid == STATE["daemon_pid"] and stack.processes["daemon"].poll() is None
    runs = list(instance.get_runs(RunsFilter(job_name="drift_check_job")))
    wait_until(lambda: any(instance.get_run_by_id(r.run_id).status == DagsterRunStatus.SUCCESS for r in runs), 120,
               3, "a drift check run to succeed")
    _say(f"drift check ticks after set-cron: {[t.strftime('%H:%M:%S') for t in found]}")
    _say(f"summary: {STATE}")
