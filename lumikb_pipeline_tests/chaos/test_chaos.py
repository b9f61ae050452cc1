"""Fault injection on the real stack (issue 12): each scenario starts a re-extraction of 60
three-chunk documents, injects one fault once it is well under way, and then only waits. The job
must end `succeeded` by itself, with the clean run's graph, one succeeded ledger row per document,
no more billed LLM calls than the clean run's plus the chunks in flight at the fault, `lumikb
progress` in line with the ledger, and nothing left held or running (`harness.assert_recovered`).
The faults: 1 a Celery child killed in an extract step; 2 the whole `reprocessing` worker killed and
started again 10 s later; 3 a batch run's process killed; 4 the Dagster daemon killed and started
again 10 s later; 5 Redis restarted without its data; 6 Neo4j unreachable for 20 s; 7 the app's
PostgreSQL restarted; 8 the LLM provider down (5xx) for 30 s, then throttling (429) for 30 s."""

import os
import signal
import time
from pathlib import Path

import pytest

from lumikb_pipeline_tests.chaos.harness import (
    Fault,
    FaultWindow,
    Measured,
    Running,
    active_extract_steps,
    assert_recovered,
    run_reextraction,
)
from lumikb_pipeline_tests.chaos.proxy import TcpProxy
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


def killed_and_restarted(process: str, what: str) -> Fault:
    """SIGKILL of a process of `lumikb up` with its whole process group (`what` it is, for the
    report); started again 10 s later, as `lumikb up --detach` does."""

    def fault(stack: Stack, _running: Running) -> FaultWindow:
        started = time.time()
        pid = stack.kill(process)
        time.sleep(10)
        stack.restart(process)
        return FaultWindow(f"SIGKILL of {what} (pid {pid}), restarted 10 s later", started, time.time())

    return fault


def test_a_killed_reprocessing_worker_group_restarted_10s_later(
    chaos_stack: Stack, clean_run: Measured, tmp_path: Path
) -> None:
    run = run_reextraction(chaos_stack, tmp_path, "2-worker-group",
                           killed_and_restarted("worker-reprocessing", "the reprocessing worker group"), clean_run)
    assert_recovered(chaos_stack, run, clean_run)


def test_a_killed_dagster_daemon_restarted_10s_later(
    chaos_stack: Stack, clean_run: Measured, tmp_path: Path
) -> None:
    run = run_reextraction(chaos_stack, tmp_path, "4-daemon", killed_and_restarted("daemon", "the Dagster daemon"),
                           clean_run)
    assert_recovered(chaos_stack, run, clean_run)


def kill_a_run_process(stack: Stack, running: Running) -> FaultWindow:
    """SIGKILL of the process of a started batch run of the job (its pid is in the run's tags)."""
    from dagster import DagsterRunStatus, RunsFilter

    from lumikb_pipeline.core.names import TAG_JOB_ID
    from lumikb_pipeline.infra.run_watchdog import TAG_RUN_PID

    def a_run_pid() -> int | None:
        with stack.instance() as instance:
            runs = instance.get_runs(RunsFilter(tags={TAG_JOB_ID: running.job_id},
                                                statuses=[DagsterRunStatus.STARTED]))
        pids = [int(run.tags[TAG_RUN_PID]) for run in runs if TAG_RUN_PID in run.tags]
        return pids[0] if pids else None

    pid = wait_until(a_run_pid, 60, 0.5, "a started run of the job")
    started = time.time()
    os.kill(pid, signal.SIGKILL)
    return FaultWindow(f"SIGKILL of a batch run's process (pid {pid})", started, started)


def test_a_killed_dagster_run_process(chaos_stack: Stack, clean_run: Measured, tmp_path: Path) -> None:
    run = run_reextraction(chaos_stack, tmp_path, "3-run-process", kill_a_run_process, clean_run)
    assert_recovered(chaos_stack, run, clean_run)


def provider_outage_then_throttling(stack: Stack, _running: Running) -> FaultWindow:
    """The LLM answers 500 to every call for 30 s, then 429 with `Retry-After: 1` to 30% of them for 30 s."""
    started = time.time()
    stack.configure_llm(rate_5xx=1.0)
    time.sleep(30)
    stack.configure_llm(rate_5xx=0.0, rate_429=0.3, retry_after_s=1.0)
    ended = time.time()
    time.sleep(30)
    stack.configure_llm(rate_429=0.0)
    return FaultWindow("LLM: 5xx on every call for 30 s, then 429 (Retry-After 1 s) on 30% for 30 s", started, ended)


def test_an_llm_outage_then_throttling(chaos_stack: Stack, clean_run: Measured, tmp_path: Path) -> None:
    run = run_reextraction(chaos_stack, tmp_path, "8-llm-5xx-429", provider_outage_then_throttling, clean_run)
    assert_recovered(chaos_stack, run, clean_run)


def redis_restarted_without_its_data(proxy: TcpProxy) -> Fault:
    def fault(stack: Stack, _running: Running) -> FaultWindow:
        """Redis restarted without persistence: every connection broken, new ones refused for the 3 s
        of a restart, and it comes back empty (queued steps, results, heartbeats, limiter state gone).
        It comes while a step waits in the `reprocessing` queue when one does within 10 s, so that a
        step message is among what is lost; not later, or the job's calls may all be made before it
        (180 calls take 19 s at 10/s, and extraction ahead makes them while runs start)."""
        import redis

        broker = redis.Redis.from_url(stack.redis_dbs[1])

        def a_step_queued() -> bool:
            return any(broker.type(key) == b"list" and broker.llen(key)
                       for key in broker.scan_iter(match="reprocessing*"))

        deadline = time.time() + 10
        while not a_step_queued() and time.time() < deadline:
            time.sleep(0.1)
        queued = a_step_queued()
        started = time.time()
        proxy.unreachable()
        for url in stack.redis_dbs:  # the stack's two databases: limiter and heartbeats; broker and results
            redis.Redis.from_url(url).flushdb()
        time.sleep(3)
        proxy.reachable()
        return FaultWindow("Redis restarted without its data (connections broken, refused for 3 s, emptied)"
                           + (" with a step queued" if queued else " (no step was queued)"), started, time.time())

    return fault


def test_redis_restarted_without_its_data(
    chaos_stack: Stack, clean_run: Measured, redis_proxy: TcpProxy, tmp_path: Path
) -> None:
    run = run_reextraction(chaos_stack, tmp_path, "5-redis", redis_restarted_without_its_data(redis_proxy), clean_run)
    assert_recovered(chaos_stack, run, clean_run)


def unreachable_for(proxy: TcpProxy, seconds: float, what: str) -> Fault:
    """The service behind `proxy` gone from the network for `seconds`: its connections broken, new
    ones refused (a restart, or a network cut); `what` it is, for the report."""

    def fault(_stack: Stack, _running: Running) -> FaultWindow:
        started = time.time()
        proxy.unreachable()
        time.sleep(seconds)
        proxy.reachable()
        return FaultWindow(what, started, time.time())

    return fault


def test_neo4j_unreachable_for_20s(
    chaos_stack: Stack, clean_run: Measured, neo4j_proxy: TcpProxy, tmp_path: Path
) -> None:
    fault = unreachable_for(neo4j_proxy, 20, "Neo4j unreachable for 20 s (connections broken, new ones refused)")
    run = run_reextraction(chaos_stack, tmp_path, "6-neo4j", fault, clean_run)
    assert_recovered(chaos_stack, run, clean_run)


def test_postgres_restarted(
    chaos_stack: Stack, clean_run: Measured, postgres_proxy: TcpProxy, tmp_path: Path
) -> None:
    # The app's PostgreSQL restarted: refused for the 5 s of a restart (the Dagster storage is not touched).
    fault = unreachable_for(postgres_proxy, 5, "the app's PostgreSQL restarted (connections broken, refused for 5 s)")
    run = run_reextraction(chaos_stack, tmp_path, "7-postgres", fault, clean_run)
    assert_recovered(chaos_stack, run, clean_run)
