"""`orchestration.respawn`: a worker that exits by itself is started again; a stop is passed on and
never answered with a restart; a crash loop gives up. Real processes and signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lumikb_pipeline.orchestration.respawn import respawn_argv

# Counts its starts in a file; exits 3 on its first start, then runs until stopped.
CHILD = """
import pathlib, sys, time
starts = pathlib.Path(sys.argv[1])
starts.write_text(starts.read_text() + "x" if starts.exists() else "x")
if len(starts.read_text()) == 1:
    sys.exit(3)
time.sleep(600)
"""


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_process_that_exits_by_itself_is_started_again_and_a_stop_stops_it(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    wrapper = _start([sys.executable, "-m", "lumikb_pipeline.orchestration.respawn", "--backoff-s", "0.1", "--",
                      sys.executable, "-c", CHILD, str(starts)])
    try:
        _wait_for(lambda: starts.exists() and len(starts.read_text()) == 2, 30, "the second start")
        time.sleep(0.5)
        assert wrapper.poll() is None and len(starts.read_text()) == 2  # running, not restarted again

        os.kill(wrapper.pid, signal.SIGTERM)  # as `lumikb down` stops it
        assert wrapper.wait(timeout=15) == 128 + signal.SIGTERM  # the child's end, passed on
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
    assert wrapper.stderr is not None
    assert b"exited by itself (status 3); starting it again" in wrapper.stderr.read()
    time.sleep(0.5)
    assert len(starts.read_text()) == 2  # not started again after the stop


def test_a_crash_loop_gives_up_with_the_childs_status(tmp_path: Path) -> None:
    wrapper = _start([sys.executable, "-m", "lumikb_pipeline.orchestration.respawn", "--backoff-s", "0.05",
                      "--max-quick-exits", "3", "--", sys.executable, "-c", "import sys; sys.exit(7)"])
    assert wrapper.wait(timeout=30) == 7
    assert wrapper.stderr is not None
    assert b"exited 3 times in a row" in wrapper.stderr.read()


def test_the_local_workers_run_under_respawn(tmp_path: Path) -> None:
    from lumikb_pipeline.core.config import Settings
    from lumikb_pipeline.orchestration.processes import service_specs, worker_argv

    settings = Settings()  # type: ignore[call-arg]
    workers = {spec.name: spec.argv for spec in service_specs(settings, tmp_path / "w.yaml", code_server_port=1)
               if spec.name.startswith("worker-")}
    assert workers == {f"worker-{queue}": respawn_argv(worker_argv(queue, settings))  # type: ignore[arg-type]
                       for queue in ("document_processing", "reprocessing")}


def test_the_resource_probe_finds_the_worker_and_its_children_under_the_wrapper(tmp_path: Path) -> None:
    # The memory benchmark and the resource-bound tests sample a worker group from the pid `lumikb up`
    # records, which is the wrapper's: the worker and its (prefork) children are one level down.
    from lumikb_pipeline_tests.orchestration.resource_probe import celery_parent, sample_group

    forks = ("import multiprocessing, time\n"
             "for _ in range(2):\n    multiprocessing.Process(target=time.sleep, args=(60,)).start()\n"
             "time.sleep(60)")
    wrapper = _start(respawn_argv([sys.executable, "-c", forks]))

    def worker_children() -> int:
        try:
            return len(celery_parent(wrapper.pid).children())
        except psutil.NoSuchProcess:  # the wrapper has not started the worker yet
            return 0

    try:
        _wait_for(lambda: worker_children() == 2, 30, "the worker's two children")
        sample = sample_group(wrapper.pid)
        assert celery_parent(wrapper.pid).cmdline()[1] == "-c"
        assert sample is not None and len(sample.children_rss) == 2
    finally:
        os.killpg(wrapper.pid, signal.SIGKILL)
        wrapper.wait()
