"""The run watchdog's verdicts on one run (the SIGKILL of a real run process is in
lumikb_pipeline_tests/dagster/test_run_watchdog.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from dagster._core.storage.dagster_run import DagsterRun

from lumikb_pipeline.infra.run_watchdog import (
    STALE_AFTER_S,
    TAG_RUN_HEARTBEAT,
    TAG_RUN_HOST,
    TAG_RUN_PID,
    why_dead,
)


def _run(pid: int, beat: float, host: str | None = None) -> DagsterRun:
    tags = {TAG_RUN_HOST: host or socket.gethostname(), TAG_RUN_PID: str(pid), TAG_RUN_HEARTBEAT: f"{beat:.3f}"}
    return DagsterRun(job_name="reextraction_job", run_id="00000000-0000-0000-0000-000000000001", tags=tags)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_whose_process_is_alive_and_beating_is_alive() -> None:
    now = time.time()
    assert why_dead(_run(os.getpid(), now - 5), start_time=now - 60, now=now) is None


def test_a_run_whose_process_is_gone_on_this_host_is_dead_at_once() -> None:
    now = time.time()
    pid = _dead_pid()
    assert why_dead(_run(pid, now - 1), start_time=now - 60, now=now) == (
        f"its process (pid {pid} on {socket.gethostname()}) is gone"
    )


def test_a_run_on_another_host_is_dead_only_once_its_heartbeat_is_stale() -> None:
    now = time.time()
    assert why_dead(_run(_dead_pid(), now - 10, host="elsewhere"), start_time=now - 600, now=now) is None
    stale = why_dead(_run(_dead_pid(), now - STALE_AFTER_S - 1, host="elsewhere"), start_time=now - 600, now=now)
    assert stale is not None and "has not given a heartbeat" in stale


def test_a_retry_that_inherited_its_dead_parents_heartbeat_is_not_failed_for_it() -> None:
    """A retry copies its parent's tags; until its own executor beats, the parent's dead pid is not
    its own: only silence for longer than STALE_AFTER_S since its start fails it."""
    now = time.time()
    inherited = _run(_dead_pid(), now - 120)
    assert why_dead(inherited, start_time=now - 3, now=now) is None
    never = why_dead(inherited, start_time=now - STALE_AFTER_S - 1, now=now)
    assert never is not None and "never gave a heartbeat" in never


def test_a_run_without_a_heartbeat_is_left_alone() -> None:
    run = DagsterRun(job_name="other_job", run_id="00000000-0000-0000-0000-000000000002")
    assert why_dead(run, start_time=0.0, now=time.time()) is None
