"""The local deployment of `lumikb up`/`demo`: private files, its own code-server port, pid files that
cannot point `down` at an unrelated process, an embedded Redis that the demo stops (issue 15)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline.core.config import Settings, load_settings
from lumikb_pipeline.orchestration import processes

runner = CliRunner()
SCHEMA = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo" / "schema_v1.yaml"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_defaults_create_private_files(lumikb_env: Path, tmp_path: Path) -> None:
    from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore

    assert runner.invoke(app, ["kb", "create", "k", "--schema", str(SCHEMA)]).exit_code == 0
    settings = load_settings()
    store = EmbeddedGraphStore(settings.home_dir / "graph.sqlite3")
    store.ensure_schema()
    assert _mode(lumikb_env) == 0o700
    for name in ("lumikb.sqlite3", "graph.sqlite3"):
        assert _mode(lumikb_env / name) == 0o600, name
    for extra in lumikb_env.glob("*.sqlite3-*"):
        assert _mode(extra) & 0o077 == 0, extra


def _settings(home: Path) -> Settings:
    return Settings(home=home)


def test_each_installation_gets_its_own_recorded_code_server_port(tmp_path: Path) -> None:
    first, second = _settings(tmp_path / "one"), _settings(tmp_path / "two")
    port_one = processes.choose_code_server_port(first)
    with socket.socket() as holder:  # the first installation's code server holds its port
        holder.bind(("127.0.0.1", port_one))
        holder.listen()
        port_two = processes.choose_code_server_port(second)
        assert port_two != port_one
    assert processes.choose_code_server_port(first) == port_one  # recorded, reused while free
    assert (tmp_path / "one" / "run" / "code-server.port").read_text() == str(port_one)
    workspace = processes.write_workspace(second, port=port_two)
    assert f"port: {port_two}" in workspace.read_text()


def _listen_forever(port: int) -> subprocess.Popen[bytes]:
    code = ("import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('127.0.0.1',{port}))\ns.listen()\ntime.sleep(120)\n")
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_wait_for_port_refuses_a_listener_that_is_not_our_process() -> None:
    port = _free_port()
    stranger = _listen_forever(port)  # another installation's code server
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        processes.wait_for_port("127.0.0.1", port, timeout_s=20, process=None)  # something listens
        with pytest.raises(RuntimeError, match="held by another process"):
            processes.wait_for_port("127.0.0.1", port, timeout_s=20, process=ours)
        processes.wait_for_port("127.0.0.1", port, timeout_s=20, process=stranger)  # its own listener is fine
    finally:
        for process in (stranger, ours):
            process.kill()
            process.wait()


def _sleeper() -> subprocess.Popen[str]:
    """A process that sleeps with SIGTERM's default action, once it has said so: whatever this
    process's own dispositions (a child inherits an ignored signal) and however slowly it starts.
    The test below once waited out `down`'s 30-s grace period (2026-12-01, a fresh clone's fast
    step; the cause was not found)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
         "print('ready', flush=True); time.sleep(120)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def test_down_never_signals_a_process_that_merely_reuses_a_recorded_pid(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "home")
    bystander = _sleeper()
    try:
        run = tmp_path / "home" / "run"
        run.mkdir(parents=True)
        # A stale pid file: the pid, with the start time of the process that had it before.
        (run / "daemon.pid").write_text(f"{bystander.pid} 1")
        assert processes.read_pid(settings, "daemon") is None
        assert processes.stop_services(settings, ["daemon"]) == []
        assert bystander.poll() is None, "an unrelated process was signalled"
        # The same pid recorded as this very process: it is ours and is stopped.
        processes.write_pid(settings, "daemon", bystander.pid)
        assert processes.read_pid(settings, "daemon") == bystander.pid
        assert processes.stop_services(settings, ["daemon"]) == ["daemon"]
        bystander.wait(10)
    finally:
        if bystander.poll() is None:
            bystander.kill()
            bystander.wait()


def test_an_old_pid_file_without_start_time_is_trusted_only_for_our_kind_of_process(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "home")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        (tmp_path / "home" / "run").mkdir(parents=True)
        (tmp_path / "home" / "run" / "webserver.pid").write_text(str(bystander.pid))
        assert processes.read_pid(settings, "webserver") is None
        assert processes.stop_services(settings, ["webserver"]) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_demo_stops_the_embedded_redis_it_started(lumikb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lumikb_pipeline import demo
    from lumikb_pipeline.infra.redis_client import embedded_redis_running, redis_url

    calls: list[str] = []

    def short_demo(settings: Settings, console: object) -> demo.DemoSummary:
        redis_url(settings)  # the demo's first use of Redis starts the embedded server
        calls.append("ran")
        raise RuntimeError("the demo failed half-way")

    monkeypatch.setattr(demo, "run_demo", short_demo)
    result = runner.invoke(app, ["demo"])
    assert calls == ["ran"] and isinstance(result.exception, RuntimeError)
    assert not embedded_redis_running(lumikb_env)


def test_the_demo_leaves_an_embedded_redis_that_was_already_running(lumikb_env: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from lumikb_pipeline import demo
    from lumikb_pipeline.infra.redis_client import embedded_redis_running, ensure_embedded_redis

    ensure_embedded_redis(lumikb_env)  # e.g. `lumikb up` runs
    monkeypatch.setattr(demo, "run_demo", lambda settings, console: (_ for _ in ()).throw(KeyboardInterrupt()))
    runner.invoke(app, ["demo"])
    assert embedded_redis_running(lumikb_env)


def test_the_environment_lumikb_up_gives_its_processes_loads_on_the_embedded_defaults(
    lumikb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The embedded Redis is a unix socket: Celery's broker URL for it is redis+socket://, which every
    # process (code server, daemon, workers) must accept when it reads its settings.
    env = processes.service_env(load_settings(), base={"LUMIKB_HOME": str(lumikb_env)})
    assert env["CELERY_BROKER_URL"].startswith("redis+socket://")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings().celery_broker_url == env["CELERY_BROKER_URL"]


def test_dagster_processes_run_nicer_than_the_workers_and_their_children_inherit_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "home")
    specs = {spec.name: spec for spec in processes.service_specs(settings, tmp_path / "workspace.yaml",
                                                                 code_server_port=1)}
    assert {name for name, spec in specs.items() if spec.niceness == processes.ORCHESTRATION_NICENESS} == {
        "code-server", "webserver", "daemon"}
    assert all(spec.niceness == 0 for name, spec in specs.items() if name.startswith("worker-"))

    # A process started as the code server is (it starts each run's process): it and its child are nicer.
    child_of = ("import subprocess, sys, time; "
                "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                "print(c.pid, flush=True); time.sleep(60)")
    spec = processes.ServiceSpec("code-server-like", [sys.executable, "-c", child_of], niceness=5)
    started = processes.start_services(settings, [spec], env={"PATH": "/usr/bin:/bin"})["code-server-like"]
    try:
        log = processes.logs_dir(settings) / "code-server-like.log"
        deadline = time.monotonic() + 30
        while not log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(log.read_text().split()[0])
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, started.pid) == min(19, own + 5)
        assert os.getpriority(os.PRIO_PROCESS, child) == min(19, own + 5)
    finally:
        os.killpg(started.pid, signal.SIGKILL)
        started.wait(10)


def _group(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except ProcessLookupError:
            continue
    return members


def _start_code_server(settings: Settings, tmp_path: Path, tmp: Path) -> tuple[int, Path]:
    """`lumikb up`'s code server with its temp files in `tmp`: its pid and its gRPC server's socket."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    [code_server] = [spec for spec in processes.service_specs(settings, tmp_path / "workspace.yaml",
                                                              code_server_port=port, webserver=False)
                     if spec.name == "code-server"]
    settings.effective_dagster_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(settings.effective_dagster_home), "TMPDIR": str(tmp)}
    processes.start_services(settings, [code_server], env)
    pid = processes.read_pid(settings, "code-server")
    assert pid is not None
    deadline = time.monotonic() + 60
    while not any(path.is_socket() for path in tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    [grpc_socket] = list(tmp.iterdir())  # the gRPC server `code-server start` runs, on a Unix socket
    return pid, grpc_socket


@pytest.mark.slow  # 35 s: the proxy waits for its stopped gRPC server until the stop's SIGKILL
def test_stopping_a_code_server_whose_grpc_server_hangs_ends_it_and_leaves_no_socket_file(
    lumikb_env: Path, tmp_path: Path
) -> None:
    settings = load_settings()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pid, grpc_socket = _start_code_server(settings, tmp_path, tmp)
    try:
        [child] = [member for member in _group(pid) if member != pid]
        os.kill(child, signal.SIGSTOP)  # it can neither answer the proxy's shutdown request nor exit
        assert processes.stop_services(settings, ["code-server"]) == ["code-server"]
        assert _group(pid) == []
        assert list(tmp.iterdir()) == [], f"left in TMPDIR: {grpc_socket.name}"
    finally:
        if _group(pid):
            os.killpg(pid, signal.SIGKILL)
