"""Fault injection on the real stack (issue 12): each scenario starts a re-extraction of 60
three-chunk documents, injects one fault once it is well under way, and then only waits. The job
must end `succeeded` by itself, with the clean run's graph, one succeeded ledger row per document,
no more billed LLM calls than the clean run's plus the calls in flight at the fault, `lumikb
progress` in line with the ledger, and nothing left held or running (`harness.assert_recovered`)."""

import os
import signal
import time
from pathlib import Path

import pytest

from lumikb_pipeline_tests.chaos.harness import (
    FaultWindow,
    Measured,
    Running,
    active_extract_steps,
    assert_recovered,
    run_reextraction,
)
from lumikb_pipeline_tests.dagster.stack import Stack, wait_until

# Starting the stack and the clean run falls in the first scenario's time.
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1500)]


def kill_an_extract_child(stack: Stack, _running: Running) -> FaultWindow:
    pids = wait_until(lambda: active_extract_steps(stack), 60, 0.5, "a Celery child running an extract step")
    started = time.time()
    os.kill(pids[0], signal.SIGKILL)
    return FaultWindow(f"SIGKILL of the Celery child (pid {pids[0]}) running an extract step", started, started)


def test_a_killed_celery_child_running_an_extract_step(chaos_stack: Stack, clean_run: Measured, tmp_path: Path) -> None:
    run = run_reextraction(chaos_stack, tmp_path, "1-extract-child", kill_an_extract_child, clean_run)
    assert_recovered(chaos_stack, run, clean_run)
