"""The local processes of `lumikb up`: a Dagster code server, the webserver, the daemon, and one
Celery worker (process group) per queue. Logs go to `LUMIKB_HOME/logs/<name>.log`, pid files to
`LUMIKB_HOME/run/<name>.pid`; every process runs in its own session so it is stopped as a group.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lumikb_pipeline.config import Settings
from lumikb_pipeline.orchestration.celery_config import broker
from lumikb_pipeline.orchestration.instance import apply_pool_limits, ensure_instance_config
from lumikb_pipeline.orchestration.names import (
    CELERY_APP_MODULE,
    DEFINITIONS_MODULE,
    LOCATION_NAME,
    QUEUE_DOCUMENT_PROCESSING,
    QUEUE_REPROCESSING,
    QUEUES,
    Queue,
)
from lumikb_pipeline.orchestration.settings import OrchestrationSettings, pin_dagster_storage_driver

CODE_SERVER_PORT = 4266
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServiceSpec:
    """One process `lumikb up` starts."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceState:
    """What `lumikb status` shows for one process."""

    name: str
    pid: int | None
    running: bool
    log: Path


def _bin(name: str) -> str:
    """An executable of this virtualenv (next to the interpreter), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def logs_dir(settings: Settings) -> Path:
    return settings.home_dir / "logs"


def run_dir(settings: Settings) -> Path:
    return settings.home_dir / "run"


def write_workspace(settings: Settings, host: str = "127.0.0.1", port: int = CODE_SERVER_PORT) -> Path:
    """The workspace the webserver and the daemon load: the code server of `lumikb up`."""
    path = settings.home_dir / "workspace.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    workspace = {"load_from": [{"grpc_server": {"host": host, "port": port, "location_name": LOCATION_NAME}}]}
    path.write_text(yaml.safe_dump(workspace, sort_keys=False))
    return path


def worker_argv(queue: Queue, orchestration: OrchestrationSettings, loglevel: str = "INFO") -> list[str]:
    """The Celery worker command for one queue: bounded concurrency and memory."""
    concurrency = (
        orchestration.document_processing_concurrency
        if queue == QUEUE_DOCUMENT_PROCESSING
        else orchestration.reprocessing_concurrency
    )
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP_MODULE, "worker",
        "-Q", queue,
        "-n", f"{queue}@%h",
        "-c", str(concurrency),
        "--prefetch-multiplier", "1",
        "--max-memory-per-child", str(orchestration.worker_max_memory_kb),
        "--max-tasks-per-child", str(orchestration.worker_max_tasks_per_child),
        "-l", loglevel,
    ]


def service_specs(
    settings: Settings,
    orchestration: OrchestrationSettings,
    workspace: Path,
    *,
    code_server_port: int = CODE_SERVER_PORT,
    webserver: bool = True,
) -> list[ServiceSpec]:
    """Every process of a local deployment, in start order."""
    specs = [
        ServiceSpec(
            "code-server",
            # `code-server start` (not `api grpc`) so that a reload imports the definitions again:
            # `lumikb schedule set-cron` relies on it to rebuild the drift schedule on the new cron.
            [_bin("dagster"), "code-server", "start", "-m", DEFINITIONS_MODULE, "-h", "127.0.0.1",
             "-p", str(code_server_port), "--location-name", LOCATION_NAME],
        ),
    ]
    if webserver:
        specs.append(
            ServiceSpec(
                "webserver",
                [_bin("dagster-webserver"), "-w", str(workspace), "-h", orchestration.webserver_host,
                 "-p", str(orchestration.webserver_port)],
            )
        )
    specs.append(ServiceSpec("daemon", [_bin("dagster-daemon"), "run", "-w", str(workspace)]))
    specs.extend(ServiceSpec(f"worker-{queue}", worker_argv(queue, orchestration)) for queue in QUEUES)
    return specs


def service_env(
    settings: Settings, orchestration: OrchestrationSettings, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of every process: the same settings everywhere, the broker resolved once."""
    env = dict(base if base is not None else os.environ)
    env["LUMIKB_HOME"] = str(settings.home_dir)
    env["DAGSTER_HOME"] = str(settings.effective_dagster_home)
    env["CELERY_BROKER_URL"] = broker(settings)
    env.setdefault("PYTHONUNBUFFERED", "1")
    pin_dagster_storage_driver(env)
    return env


def _pidfile(settings: Settings, name: str) -> Path:
    return run_dir(settings) / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this very process counts as gone.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return True
    return status != "Z"


def read_pid(settings: Settings, name: str) -> int | None:
    """The pid recorded for a process, if its pid file exists."""
    path = _pidfile(settings, name)
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def start_services(
    settings: Settings, specs: Sequence[ServiceSpec], env: Mapping[str, str]
) -> dict[str, subprocess.Popen[bytes]]:
    """Start each process (in its own session, output to its log file) unless it already runs."""
    logs_dir(settings).mkdir(parents=True, exist_ok=True)
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    started: dict[str, subprocess.Popen[bytes]] = {}
    for spec in specs:
        pid = read_pid(settings, spec.name)
        if pid is not None and _alive(pid):
            continue
        log = open(logs_dir(settings) / f"{spec.name}.log", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**env, **spec.env}, start_new_session=True, cwd=str(settings.home_dir),
        )
        log.close()
        _pidfile(settings, spec.name).write_text(str(process.pid))
        started[spec.name] = process
        if spec.name == "code-server":
            wait_for_port("127.0.0.1", int(spec.argv[spec.argv.index("-p") + 1]), timeout_s=120, process=process)
    return started


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on host:port (or the process exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def stop_services(settings: Settings, names: Sequence[str]) -> list[str]:
    """Stop the recorded processes (their whole process groups): SIGTERM, then SIGKILL after a
    grace period. Returns the names that were running."""
    stopped = []
    pids = {name: read_pid(settings, name) for name in names}
    for name, pid in pids.items():
        if pid is not None and _alive(pid):
            _signal_group(pid, signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name in stopped:
        pid = pids[name]
        assert pid is not None
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
    for name in names:
        _pidfile(settings, name).unlink(missing_ok=True)
    return stopped


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # each service leads its own session and group
    except ProcessLookupError:
        pass


def service_states(settings: Settings, names: Sequence[str]) -> list[ServiceState]:
    """Each process: its pid and whether it runs."""
    states = []
    for name in names:
        pid = read_pid(settings, name)
        states.append(ServiceState(name, pid, pid is not None and _alive(pid), logs_dir(settings) / f"{name}.log"))
    return states


def service_names() -> list[str]:
    return ["code-server", "webserver", "daemon", *(f"worker-{queue}" for queue in QUEUES)]


def prepare_instance(settings: Settings, orchestration: OrchestrationSettings) -> Path:
    """Write `dagster.yaml` if missing and apply the pool limits; returns the Dagster home."""
    from dagster import DagsterInstance

    pin_dagster_storage_driver()
    home = ensure_instance_config(settings, orchestration)
    with DagsterInstance.from_config(str(home)) as instance:
        apply_pool_limits(instance, orchestration)
    return home


__all__ = [
    "QUEUE_REPROCESSING", "ServiceSpec", "ServiceState", "prepare_instance", "service_env", "service_names",
    "service_specs", "service_states", "start_services", "stop_services", "wait_for_port", "worker_argv",
    "write_workspace",
]
