"""Retention of Dagster's per-run folders (step outputs, compute logs): old finished runs' folders
are deleted, those of recent or unfinished runs are kept."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, Output, job, op

from lumikb_pipeline.infra.run_retention import prune_run_storage


@op
def make_output() -> Output[int]:
    return Output(41)


@op
def use_output(value: int) -> int:
    return value + 1


@job
def two_steps() -> None:
    use_output(make_output())


def test_old_finished_runs_lose_their_step_outputs_and_compute_logs_and_others_keep_them(tmp_path: Path) -> None:
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        finished = two_steps.execute_in_process(instance=instance).run_id
        storage = Path(instance.storage_directory())
        assert (storage / finished).is_dir() and any((storage / finished).rglob("*"))
        unfinished = instance.create_run_for_job(two_steps, status=DagsterRunStatus.STARTED).run_id
        (storage / unfinished / "compute_logs").mkdir(parents=True)
        orphan = storage / str(uuid.uuid4())  # a run the instance no longer knows (deleted)
        orphan.mkdir()
        unrelated = storage / "not-a-run"
        unrelated.mkdir()
        assert instance.get_run_by_id(unfinished).status == DagsterRunStatus.STARTED

        assert prune_run_storage(instance, retention_s=3600) == 0  # everything is younger than an hour
        assert prune_run_storage(instance, retention_s=3600, now=time.time() + 7200) == 2

        assert not (storage / finished).exists() and not orphan.exists()
        assert (storage / unfinished).is_dir() and unrelated.is_dir()

