"""Retention of what Dagster keeps per run outside its event log: step outputs and compute logs.

The rule, in one place: a run's leftovers are deleted once the run finished more than `RETENTION_S`
ago (a retry from failure, which reads its parent run's step outputs, comes long before), or, for a
run the instance no longer knows, once they were left untouched that long; an unfinished run's are
never touched. Step outputs of a run that *succeeded* go at once: nothing re-executes from it.

- Step outputs (the outcome lists handed from extract to write) live in the app database
  (`resources.StepOutputIOManager`); `expired_step_output_runs` says whose rows to delete, and the
  job-status sensor deletes them on every tick.
- Compute logs live under the instance's storage directory (`DAGSTER_HOME/storage/<run id>/`), one
  folder per run on each machine that ran a step; `prune_run_storage` deletes the expired folders.
  The job-status sensor runs it at most every `PRUNE_INTERVAL_S`, and so does every Celery worker
  after a task (for the folders on its own machine).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster import DagsterInstance

RETENTION_S = 24 * 3600.0
PRUNE_INTERVAL_S = 600.0
_BATCH = 200
_RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

_last_prune = 0.0
_last_prune_lock = threading.Lock()


def prune_run_storage(instance: DagsterInstance, retention_s: float = RETENTION_S, now: float | None = None) -> int:
    """Delete the storage folders of runs finished more than `retention_s` ago (or unknown to the
    instance and untouched for as long); returns how many were deleted."""
    from dagster import RunsFilter

    now = now if now is not None else time.time()
    base = Path(instance.storage_directory())
    if not base.is_dir():
        return 0
    folders = {path.name: path for path in base.iterdir() if path.is_dir() and _RUN_ID.match(path.name)}
    names = list(folders)
    deleted = 0
    for start in range(0, len(names), _BATCH):
        batch = names[start : start + _BATCH]
        records = {r.dagster_run.run_id: r for r in instance.get_run_records(RunsFilter(run_ids=batch))}
        for name in batch:
            record = records.get(name)
            if _expired(record, folders[name].stat().st_mtime, retention_s, now):
                shutil.rmtree(folders[name], ignore_errors=True)
                deleted += 1
    return deleted


def expired_step_output_runs(
    instance: DagsterInstance, stored: Mapping[str, datetime], retention_s: float = RETENTION_S,
    now: float | None = None,
) -> list[str]:
    """The runs among `stored` (run id -> time of its newest stored output) whose step outputs may
    be deleted: succeeded ones at once, the others by the retention rule."""
    from dagster import DagsterRunStatus, RunsFilter

    now = now if now is not None else time.time()
    names = list(stored)
    expired: list[str] = []
    for start in range(0, len(names), _BATCH):
        batch = names[start : start + _BATCH]
        records = {r.dagster_run.run_id: r for r in instance.get_run_records(RunsFilter(run_ids=batch))}
        for name in batch:
            record = records.get(name)
            succeeded = record is not None and record.dagster_run.status == DagsterRunStatus.SUCCESS
            if succeeded or _expired(record, stored[name].timestamp(), retention_s, now):
                expired.append(name)
    return expired


def _expired(record: Any, touched: float, retention_s: float, now: float) -> bool:
    """The rule: finished more than `retention_s` ago, or unknown and untouched for as long."""
    if record is None:
        return now - touched > retention_s
    end = record.end_time
    return bool(record.dagster_run.is_finished and end is not None and now - end > retention_s)


def prune_run_storage_now_and_then(instance: DagsterInstance, interval_s: float = PRUNE_INTERVAL_S) -> list[str]:
    """`prune_run_storage`, at most once per `interval_s` in this process; returns a line when it
    deleted something."""
    global _last_prune
    with _last_prune_lock:
        if time.time() - _last_prune < interval_s:
            return []
        _last_prune = time.time()
    deleted = prune_run_storage(instance)
    return [f"deleted the step outputs and compute logs of {deleted} old run(s)"] if deleted else []
