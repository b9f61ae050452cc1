"""Runs of dead processes end by themselves: a run heartbeat, and the watchdog that reads it.

Dagster's default run launcher has no health check of run workers, so a run whose process is killed
(`kill -9` of `lumikb demo`, of a run worker, `lumikb down` in mid-job) stays `STARTED` until its
max runtime, holding its run slot and its pool slots. So every run of our executors records where
it runs and beats (`run_heartbeat`: run tags `lumikb/run_host`, `lumikb/run_pid`,
`lumikb/run_heartbeat`, the last renewed every `HEARTBEAT_INTERVAL_S`), and the job-status sensor
runs `fail_dead_runs`: a `STARTED` run whose process is gone (same host, no such process) or whose
heartbeat is older than `STALE_AFTER_S` (any host) is reported failed through the instance and its
pool slots are freed at once. Its ledger rows are then closed by the reaper
(`reextraction.reaper.reap_abandoned_work`), and Dagster's run retries, when enabled, take over.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumikb_pipeline.core.repeating import repeating

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from dagster._core.storage.dagster_run import DagsterRun

TAG_RUN_HOST = "lumikb/run_host"
TAG_RUN_PID = "lumikb/run_pid"
TAG_RUN_HEARTBEAT = "lumikb/run_heartbeat"
HEARTBEAT_INTERVAL_S = 15.0
STALE_AFTER_S = 90.0  # six missed beats: a stalled storage, not a slow one


@contextmanager
def run_heartbeat(instance: DagsterInstance, run_id: str, interval_s: float = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
    """Record this process as the run's worker and renew its heartbeat until the block ends."""
    instance.add_run_tags(run_id, {
        TAG_RUN_HOST: socket.gethostname(), TAG_RUN_PID: str(os.getpid()), TAG_RUN_HEARTBEAT: f"{time.time():.3f}",
    })

    def beat() -> None:
        instance.add_run_tags(run_id, {TAG_RUN_HEARTBEAT: f"{time.time():.3f}"})

    with repeating(beat, interval_s, f"run-heartbeat-{run_id[:8]}"):
        yield


def with_run_heartbeat(plan_context: Any, events: Iterator[Any]) -> Iterator[Any]:
    """An executor's event stream, with the run's heartbeat beating while it runs."""
    with run_heartbeat(plan_context.instance, plan_context.run_id):
        yield from events


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child its parent has not reaped yet is a zombie: gone as well
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def why_dead(
    run: DagsterRun, start_time: float | None = None, now: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> str | None:
    """Why a started run's worker is gone, or None when it is alive (or the run has no heartbeat).

    A retry of a run copies its parent's tags, heartbeat included, until its own executor starts
    beating: a heartbeat older than the run's `start_time` is not this run's, and only its silence
    for `stale_after_s` since the start counts."""
    tags = run.tags
    if TAG_RUN_HEARTBEAT not in tags:
        return None
    now = now if now is not None else time.time()
    host, pid = tags.get(TAG_RUN_HOST), int(tags.get(TAG_RUN_PID, "0") or 0)
    beat = float(tags[TAG_RUN_HEARTBEAT])
    if start_time is not None and beat < start_time:
        silent = now - start_time
        return f"its process never gave a heartbeat in {silent:.0f} s" if silent > stale_after_s else None
    if host == socket.gethostname() and pid and _process_gone(pid):
        return f"its process (pid {pid} on {host}) is gone"
    if now - beat > stale_after_s:
        return f"its process (pid {pid} on {host}) has not given a heartbeat for {now - beat:.0f} s"
    return None


def fail_dead_runs(instance: DagsterInstance, now: float | None = None) -> list[str]:
    """Report every `STARTED` run whose worker is gone as failed, and free its pool slots; returns
    one line per run."""
    from dagster import DagsterRunStatus, RunsFilter

    lines = []
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        run = record.dagster_run
        reason = why_dead(run, record.start_time, now)
        if reason is None:
            continue
        instance.report_run_failed(
            run, message=f"Run {run.run_id} failed: {reason} (the lumikb run watchdog ended it and freed its slots)."
        )
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        lines.append(f"run {run.run_id}: failed, {reason}")
    return lines
