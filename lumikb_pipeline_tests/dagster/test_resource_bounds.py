"""Resource bounds of the running deployment (issue 12, point 3), measured on its real processes.

- Connections held by the Celery worker groups, as PostgreSQL (`pg_stat_activity`), Redis
  (`CLIENT LIST`) and Neo4j (`dbms.listConnections()`) list them, stay flat while steps run: every
  process keeps one pool per server instead of a client per call.
- No temp files are left in the processes' TMPDIR (the stack points it at a folder of its own) after
  a document that succeeds, one that fails, and a step whose worker process is killed.
- An idle worker group uses < 1% of a CPU over 30 s.
- A worker started with `LUMIKB_WORKER_AUTOSCALE_MIN` (`celery worker --autoscale`) grows its pool
  for work and shrinks it back once its queue is empty.

Memory over time is `benchmarks/memory.py` (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from dagster import DagsterRunStatus, In, JobDefinition, Nothing, RunsFilter, execute_job, job, op, reconstructable

from lumikb_pipeline_tests.dagster.helpers import (
    create_kb,
    database_url,
    document_text,
    ingest,
    ledger_counts,
    partition_keys,
    unique_slug,
    write_documents,
)
from lumikb_pipeline_tests.dagster.stack import Stack, wait_until
from lumikb_pipeline_tests.orchestration import resource_probe

pytestmark = pytest.mark.slow

QUEUES = ("document_processing", "reprocessing")
AUTOSCALE_QUEUE = "lumikb_autoscale_probe"
PROBE_STEPS = 3


def _settings() -> Any:
    from lumikb_pipeline.core.config import load_settings

    return load_settings()


def _worker_pids() -> dict[str, int]:
    from lumikb_pipeline.orchestration.processes import read_pid

    settings = _settings()
    pids = {queue: read_pid(settings, f"worker-{queue}") for queue in QUEUES}
    assert all(pids.values()), pids
    return {queue: pid for queue, pid in pids.items() if pid is not None}


def _connections(stack: Stack, parents: dict[str, int]) -> dict[str, int]:
    pids = [process.pid for parent in parents.values() for process in resource_probe.worker_group(parent)]
    ports = resource_probe.local_ports(pids)
    database = stack.app_db_url.rsplit("/", 1)[1]
    return {
        "postgres": resource_probe.postgres_connections(stack.app_db_url, database, ports),
        "redis": resource_probe.redis_connections(stack.redis_dbs[0], ports),
        "neo4j": resource_probe.neo4j_connections(ports),
    }


def _ingest_one_run_per_document(slug: str, folder: Path, count: int) -> list[str]:
    """`count` new documents, each between two already-extracted ones (a transaction each, so the
    partitions sensor orders them by their times): every run it requests holds one document."""
    from lumikb_pipeline.db import catalog, ledger
    from lumikb_pipeline.db.session import session_scope

    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(count):
        for kind in ("new", "done"):
            path = folder / f"{kind}-{i:04d}.txt"
            path.write_text(document_text(f"{slug.replace('-', '')}{kind}", i))
            with session_scope(database_url()) as session:
                kb = catalog.get_kb(session, slug)
                doc_id = catalog.ingest_file(session, kb, path, 400)[1]
                if kind == "new":
                    ids.append(doc_id)
                    continue
                ledger.ensure_records(session, kb.id, [doc_id], kb.current_schema_version)
                assert ledger.claim(session, doc_id, kb.current_schema_version, "test-seed")
                ledger.mark_succeeded(session, doc_id, kb.current_schema_version, "test-seed", ledger.Outcome())
    return ids


def _runs_of(stack: Stack, doc_ids: list[str]) -> list[Any]:
    wanted = set(partition_keys(doc_ids))  # runs name their documents by partition key
    with stack.instance() as instance:
        return [run for run in instance.get_runs(RunsFilter(job_name="document_processing_job"))
                if run.tags.get("dagster/asset_partition_range_start") in wanted]


def _runs_finished(stack: Stack) -> bool:
    with stack.instance() as instance:
        return not instance.get_runs(RunsFilter(statuses=[
            DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING,
        ]))


# --------------------------------------------------------------------------- connections


# unreliable: on the last full run (2026-11-30, load 8-12) only 10 of its 24 one-document runs ended within
# its 170 s (docs/testing.md).
@pytest.mark.unreliable
def test_connections_of_the_workers_stay_flat_while_steps_run(stack: Stack, tmp_path: Path) -> None:
    """Steps of one-document runs on the document_processing worker: once the first half of them
    ran (every child has opened its pools), no later sample holds more connections than that half."""
    documents = 24
    parents = _worker_pids()
    slug = unique_slug("conn")
    create_kb(slug)
    ids = _ingest_one_run_per_document(slug, tmp_path / "docs", documents)
    samples: list[tuple[int, dict[str, int]]] = []
    deadline = time.monotonic() + 170
    while True:
        done = ledger_counts(slug)[(1, "succeeded")] - documents  # less the already-extracted neighbours
        samples.append((done, _connections(stack, parents)))
        if done >= len(ids):
            break
        assert time.monotonic() < deadline, f"{done} of {len(ids)} documents after 170 s"
        time.sleep(2)
    steps = 2 * len(_runs_of(stack, ids))
    assert steps >= documents, f"only {steps} steps: the documents did not get runs of their own"
    first = [counts for done, counts in samples if done <= documents // 2]
    second = [counts for done, counts in samples if done > documents // 2]
    assert first and second, samples
    for server in ("postgres", "redis", "neo4j"):
        ceiling = max(counts[server] for counts in first)
        peak = max(counts[server] for counts in second)
        print(f"{server}: first half max {ceiling}, second half max {peak}, last {second[-1][server]} "
              f"({steps} steps)")
        assert peak <= ceiling, (server, samples)
        assert ceiling > 0, (server, samples)


# --------------------------------------------------------------------------- temp files


def _tmp_entries(stack: Stack) -> set[str]:
    return set(os.listdir(stack.env["TMPDIR"]))


def _active_step_pid(queue: str) -> int | None:
    from lumikb_pipeline.orchestration.celery_app import app

    replies = app.control.inspect(timeout=3).active() or {}
    for name, tasks in replies.items():
        if name.startswith(f"{queue}@"):
            for task in tasks:
                return int(task["worker_pid"])
    return None


def test_no_temp_files_left_after_success_failure_and_a_killed_step(stack: Stack, tmp_path: Path) -> None:
    wait_until(lambda: _runs_finished(stack), 120, 2, "earlier runs to finish")
    before = _tmp_entries(stack)
    slug = unique_slug("tmp")
    create_kb(slug)

    # Success and failure: one document the fake LLM fails for good.
    stack.poison("Zanzibar", -1)
    try:
        write_documents(tmp_path / "a", slug.replace("-", ""), 4, markers={3: "Zanzibar"})
        ingest(slug, tmp_path / "a")
        wait_until(lambda: ledger_counts(slug)[(1, "succeeded")] == 3 and ledger_counts(slug)[(1, "failed")] == 1,
                   150, 2, "3 documents extracted and 1 failed")
    finally:
        stack.poison(None)

    wait_until(lambda: _runs_finished(stack), 150, 2, "the runs (and retries) of those documents to finish")

    # A step whose worker process is killed in mid-call: Celery gives the step back, it runs again.
    stack.hold_llm(True)
    try:
        write_documents(tmp_path / "b", f"{slug.replace('-', '')}k", 2)
        ingest(slug, tmp_path / "b")
        wait_until(lambda: stack.hold_llm()["waiting"] >= 1, 120, 1, "an extract step calling the LLM")
        pid = wait_until(lambda: _active_step_pid("document_processing"), 30, 1, "the step's worker process")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    finally:
        stack.hold_llm(False)
    # The redelivered step finds its documents still claimed by the killed process (their lease runs
    # on); what matters here is that the run ends and nothing is left behind.
    wait_until(lambda: _runs_finished(stack), 180, 2, "the run of the killed step to finish")
    time.sleep(3)  # the replaced child's helpers exit
    left = _tmp_entries(stack) - before
    assert not left, f"temp files left in {stack.env['TMPDIR']}: {sorted(left)}"


# --------------------------------------------------------------------------- idle CPU and autoscaling


@op
def _probe_step() -> None:
    time.sleep(10)


@op(ins={"after": In(Nothing)})
def _probe_done() -> None:
    pass


def autoscale_probe_job() -> JobDefinition:
    """Three 10-s steps at once on the probe queue (module level: `reconstructable` needs it)."""
    from lumikb_pipeline.infra.executor import celery_executor_for

    @job(name="autoscale_probe", executor_def=celery_executor_for(AUTOSCALE_QUEUE))  # type: ignore[arg-type]
    def _job() -> None:
        _probe_done([_probe_step.alias(f"step_{i}")() for i in range(PROBE_STEPS)])

    return _job


@pytest.fixture(scope="module")
def autoscaling_worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[psutil.Process]:
    """A worker of `lumikb up`'s command with LUMIKB_WORKER_AUTOSCALE_MIN=1 and a concurrency of
    3, on a queue of its own."""
    from lumikb_pipeline.orchestration import processes

    settings = _settings().model_copy(update={"reprocessing_concurrency": PROBE_STEPS, "worker_autoscale_min": 1})
    argv = processes.worker_argv("reprocessing", settings)
    assert argv[argv.index("--autoscale") + 1] == f"{PROBE_STEPS},1"
    argv[argv.index("-Q") + 1] = AUTOSCALE_QUEUE
    argv[argv.index("-n") + 1] = f"{AUTOSCALE_QUEUE}@%h"
    log = tmp_path_factory.mktemp("autoscale") / "worker.log"
    env = processes.service_env(settings, stack.env)
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   cwd=str(settings.home_dir))
    try:
        wait_until(lambda: "ready." in log.read_text(errors="replace"), 120, 1, "the autoscaling worker")
        yield psutil.Process(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# unreliable: failed on the last full run (2026-11-30, load 8-12), passed before (docs/testing.md).
@pytest.mark.unreliable
def test_an_idle_worker_uses_under_1_percent_of_a_cpu(stack: Stack, autoscaling_worker: psutil.Process) -> None:
    wait_until(lambda: _runs_finished(stack), 120, 2, "earlier runs to finish")
    time.sleep(5)  # the last steps' children settle
    groups = {**_worker_pids(), AUTOSCALE_QUEUE: autoscaling_worker.pid}
    before = {name: resource_probe.group_cpu_seconds(pid) for name, pid in groups.items()}
    started = time.monotonic()
    time.sleep(30)
    elapsed = time.monotonic() - started
    shares = {name: (resource_probe.group_cpu_seconds(pid) - before[name]) / elapsed for name, pid in groups.items()}
    print("idle CPU share per worker group:", {name: f"{share:.2%}" for name, share in shares.items()})
    assert all(share < 0.01 for share in shares.values()), shares


# unreliable: failed on the last full run (2026-11-30): the pool's shrink was not seen (docs/testing.md).
@pytest.mark.unreliable
def test_a_worker_pool_grows_for_work_and_shrinks_when_its_queue_is_empty(
    stack: Stack, autoscaling_worker: psutil.Process
) -> None:
    def pool_size() -> int:
        # Live pool processes (a child that exited may be listed until the parent reaps it).
        return sum(1 for child in autoscaling_worker.children() if child.status() != psutil.STATUS_ZOMBIE)

    assert pool_size() == 1  # the minimum while idle
    sizes: list[int] = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            sizes.append(pool_size())
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with stack.instance() as instance, execute_job(reconstructable(autoscale_probe_job), instance) as result:
        assert result.success
    ended = time.monotonic()
    assert max(sizes) == PROBE_STEPS, sizes  # grew to run the three steps at once
    try:
        wait_until(lambda: pool_size() == 1, 90, 1, "the pool to shrink back to 1 process")
    except AssertionError:
        children = [(child.pid, child.status(), child.cmdline()[:3]) for child in autoscaling_worker.children()]
        raise AssertionError(f"the pool did not shrink to 1 process: children {children}") from None
    finished.set()
    watcher.join()
    print(f"pool sizes while the job ran: max {max(sizes)}; back to 1 process {time.monotonic() - ended:.0f} s "
          "after the last step")
