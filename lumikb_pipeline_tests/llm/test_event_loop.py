"""The process's LLM event loop: one long-lived thread, run before the machine's batch work where allowed."""

from __future__ import annotations

import os
import threading

from lumikb_pipeline.llm.event_loop import LOOP_NICENESS, run_in_loop_thread
from lumikb_pipeline_tests.llm.priority import allowed_in_a_new_thread


async def _thread_and_niceness() -> tuple[int, int]:
    tid = threading.get_native_id()
    return tid, os.getpriority(os.PRIO_PROCESS, tid)


def test_calls_run_on_one_long_lived_loop_thread() -> None:
    first, _ = run_in_loop_thread(_thread_and_niceness())
    second, _ = run_in_loop_thread(_thread_and_niceness())
    assert first == second != threading.get_native_id()


def test_the_loop_thread_runs_nicer_by_minus_ten_where_allowed_and_only_that_thread() -> None:
    """Preparing requests and taking answers needs CPU on time, even while Neo4j and a write step keep
    the machine busy: `nice` -10 where the process may (root here, `nice: 30` in docker-compose),
    unchanged without an error elsewhere; the calling thread keeps its own niceness."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    allowed = allowed_in_a_new_thread(
        lambda: os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), own + LOOP_NICENESS)
    )

    _, loop_niceness = run_in_loop_thread(_thread_and_niceness())

    assert loop_niceness == (max(-20, own + LOOP_NICENESS) if allowed else own)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
