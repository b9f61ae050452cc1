"""A Celery worker keeps its own machine's run folders (compute logs) bounded: after a task, at most
every PRUNE_INTERVAL_S, it deletes the folders the run retention rule lets go."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from dagster import DagsterInstance


def test_a_worker_prunes_old_run_folders_on_its_own_machine_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lumikb_pipeline.orchestration import celery_app

    home = tmp_path / "dagster"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        storage = Path(instance.storage_directory())
    old, recent = storage / str(uuid.uuid4()), storage / str(uuid.uuid4())  # runs this instance does not know
    for folder in (old, recent):
        (folder / "compute_logs").mkdir(parents=True)
        (folder / "compute_logs" / "step.out").write_text("printed by a step")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))

    monkeypatch.setattr(celery_app, "_last_prune", time.monotonic())  # pruned a moment ago: not again yet
    celery_app._prune_this_machines_run_folders()
    assert old.exists()

    monkeypatch.setattr(celery_app, "_last_prune", time.monotonic() - celery_app.PRUNE_INTERVAL_S - 1)
    celery_app._prune_this_machines_run_folders()
    assert not old.exists() and recent.exists()
