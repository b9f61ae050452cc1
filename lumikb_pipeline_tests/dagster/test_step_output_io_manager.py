"""The step-output IO manager: a run's steps hand their outputs over through the app database (no
folder shared between machines), a retry from failure reads its parent run's outputs, and the
outputs are deleted once their run succeeded or by the run retention rule."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    Failure,
    In,
    Out,
    ReexecutionOptions,
    execute_job,
    in_process_executor,
    job,
    op,
    reconstructable,
)

from lumikb_pipeline.db import step_outputs
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.db.step_outputs import MAX_STEP_OUTPUT_BYTES, StepOutputKey
from lumikb_pipeline.infra.run_retention import expired_step_output_runs
from lumikb_pipeline.resources import DatabaseResource, StepOutputIOManager

FAIL_FLAG = "LUMIKB_TEST_FAIL_CONSUME"


@op(out=Out(list))
def produce() -> list[dict[str, object]]:
    return [{"doc_id": f"d{i}", "status": "extracted"} for i in range(3)]


@op(ins={"outcomes": In(list)})
def consume(outcomes: list[dict[str, object]]) -> int:
    import os

    if os.environ.get(FAIL_FLAG) == "1":
        raise Failure("the graph write failed", allow_retries=False)
    return len(outcomes)


@job
def hand_over() -> None:
    consume(produce())


def _stored(url: str) -> dict[str, datetime]:
    with session_scope(url) as session:
        return step_outputs.stored_runs(session)


def _run_folders(instance: DagsterInstance, run_id: str) -> list[Path]:
    """Step-output files Dagster's filesystem IO manager would have written for the run."""
    folder = Path(instance.storage_directory()) / run_id
    return [path for path in folder.rglob("*") if path.is_file() and "compute_logs" not in path.parts]


def test_the_next_step_reads_the_output_from_the_app_database_and_no_file_is_written(
    db_url: str, tmp_path: Path
) -> None:
    resources = {"io_manager": StepOutputIOManager(database_url=db_url)}
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        result = hand_over.execute_in_process(instance=instance, resources=resources)
        assert result.success and result.output_for_node("consume") == 3
        stored = _stored(db_url)
        assert set(stored) == {result.run_id}
        with session_scope(db_url) as session:
            payload = step_outputs.load(session, StepOutputKey(result.run_id, "produce", "result"))
        assert payload is not None
        assert _run_folders(instance, result.run_id) == []
        handled = [e for e in result.all_events if e.event_type_value == "HANDLED_OUTPUT"]
        assert handled and handled[0].event_specific_data.metadata["stored_in"].value.startswith("app database")


def test_a_retry_from_failure_reads_the_output_its_parent_run_stored(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAIL_FLAG, "1")
    config = {"resources": {"io_manager": {"config": {"database_url": sqlite_url}}}}
    recon = reconstructable(hand_over_configured_at_launch)
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        with execute_job(recon, instance=instance, run_config=config) as first:
            assert not first.success
        monkeypatch.setenv(FAIL_FLAG, "0")
        options = ReexecutionOptions.from_failure(first.run_id, instance)
        with execute_job(recon, instance=instance, run_config=config, reexecution_options=options) as retry:
            assert retry.success and retry.output_for_node("consume") == 3
            started = {e.step_key for e in retry.all_events if e.event_type_value == "STEP_START"}
        assert started == {"consume"}  # produce is not run again: its output is read from the parent run
        assert set(_stored(sqlite_url)) == {first.run_id, retry.run_id}  # consume's own output: the retry's


@job(resource_defs={"io_manager": StepOutputIOManager.configure_at_launch()}, executor_def=in_process_executor)
def hand_over_configured_at_launch() -> None:
    consume(produce())


def test_outputs_are_deleted_once_their_run_succeeded_and_by_the_retention_rule_otherwise(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = {"io_manager": StepOutputIOManager(database_url=sqlite_url)}
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        succeeded = hand_over.execute_in_process(instance=instance, resources=resources).run_id
        monkeypatch.setenv(FAIL_FLAG, "1")
        failed = hand_over.execute_in_process(instance=instance, resources=resources, raise_on_error=False).run_id
        unfinished = instance.create_run_for_job(hand_over).run_id  # not started yet: never touched
        unknown = str(uuid.uuid4())  # a run the instance no longer knows
        with session_scope(sqlite_url) as session:
            step_outputs.save(session, StepOutputKey(unfinished, "produce", "result"), b"x")
            step_outputs.save(session, StepOutputKey(unknown, "produce", "result"), b"y")
        stored = _stored(sqlite_url)
        assert set(stored) == {succeeded, failed, unfinished, unknown}

        # The rule: the succeeded run's outputs go at once; the failed run's stay for its retries.
        assert expired_step_output_runs(instance, stored) == [succeeded]
        later = time.time() + 2 * 24 * 3600
        assert set(expired_step_output_runs(instance, stored, now=later)) == {succeeded, failed, unknown}

        # The sensor's call deletes them.
        database = DatabaseResource(database_url=sqlite_url)
        # produce's and consume's outputs of the succeeded run
        assert database.prune_step_outputs(instance) == ["deleted 2 step output(s) of 1 ended run(s)"]
        assert set(_stored(sqlite_url)) == {failed, unfinished, unknown}
        assert database.prune_step_outputs(instance) == []
        with session_scope(sqlite_url) as session:
            assert step_outputs.stored_size(session)[0] == 3  # failed: produce only; unfinished; unknown
            assert step_outputs.delete_runs(session, [failed, unknown]) == 2
            assert set(step_outputs.stored_runs(session)) == {unfinished}
            assert step_outputs.stored_runs(session)[unfinished] > datetime.now(UTC) - timedelta(minutes=5)


def test_an_output_too_large_to_hand_over_is_refused_with_what_to_do(sqlite_url: str) -> None:
    key = StepOutputKey(str(uuid.uuid4()), "extract_document_entities", "result")
    with session_scope(sqlite_url) as session, pytest.raises(ValueError) as refused:
        step_outputs.save(session, key, b"\0" * (MAX_STEP_OUTPUT_BYTES + 1))
    message = str(refused.value)
    assert "extract_document_entities" in message and key.run_id in message and "reference" in message


def test_a_missing_output_says_which_and_what_to_do(sqlite_url: str, tmp_path: Path) -> None:
    config = {"resources": {"io_manager": {"config": {"database_url": sqlite_url}}}}
    recon = reconstructable(hand_over_configured_at_launch)
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        with execute_job(recon, instance=instance, run_config=config) as first:
            assert first.success
        DatabaseResource(database_url=sqlite_url).prune_step_outputs(instance)  # it succeeded: deleted
        options = ReexecutionOptions(parent_run_id=first.run_id, step_selection=["consume"])
        with execute_job(recon, instance=instance, run_config=config, reexecution_options=options,
                         raise_on_error=False) as again:
            assert not again.success
            errors = [str(event.event_specific_data.error) for event in again.all_events
                      if event.event_type_value == "STEP_FAILURE"]
        assert any(f"step 'produce' of run {first.run_id}" in error and "Re-execute the whole run" in error
                   for error in errors), errors
