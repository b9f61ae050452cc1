"""Retention of Dagster's per-run files: step outputs and compute logs.

Dagster keeps, under the instance's storage directory (`DAGSTER_HOME/storage`), one folder per run:
the outputs of its steps (the filesystem IO manager: the outcome lists handed from extract to
write) and its steps' compute logs (`<run id>/compute_logs`). Nothing deletes them, so the folder
grows by one entry per run. `prune_run_storage` deletes the folders of runs that finished more than
`RETENTION_S` ago (a retry from failure, which reads its parent run's outputs, comes long before),
and of runs the instance no longer knows; the folders of unfinished runs are never touched. The
job-status sensor runs it at most every `PRUNE_INTERVAL_S`.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

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
            if record is None:
                expired = now - folders[name].stat().st_mtime > retention_s
            else:
                end = record.end_time
                expired = record.dagster_run.is_finished and end is not None and now - end > retention_s
            if expired:
                shutil.rmtree(folders[name], ignore_errors=True)
                deleted += 1
    return deleted


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
