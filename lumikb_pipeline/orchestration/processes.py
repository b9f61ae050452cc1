"""The local processes of `lumikb up`: a Dagster code server, the webserver, the daemon, and one
Celery worker (process group) per queue, started again when it exits by itself (`respawn`). Logs go
to `LUMIKB_HOME/logs/<name>.log`, pid files to `LUMIKB_HOME/run/<name>.pid`; every process runs in
its own session so it is stopped as a group.
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

from lumikb_pipeline.core.config import Settings, make_private_dir
from lumikb_pipeline.core.names import (
    CELERY_APP_MODULE,
    DEFINITIONS_MODULE,
    LOCATION_NAME,
    QUEUE_DOCUMENT_PROCESSING,
    QUEUE_REPROCESSING,
    QUEUES,
    Queue,
)
from lumikb_pipeline.infra.dagster_instance import apply_pool_limits, ensure_instance_config, pin_dagster_storage_driver
from lumikb_pipeline.infra.redis_client import broker_url
from lumikb_pipeline.orchestration.respawn import respawn_argv

STOP_TIMEOUT_S = 30.0
ORPHAN_GRACE_S = 5.0
KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class ServiceSpec:
    """One process `lumikb up` starts; `niceness` is added to this process's own (`nice`)."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    niceness: int = 0


# Dagster's own processes (the code server, which starts every run's process, the daemon and the
# webserver) yield the CPU to the workers when one machine runs everything: a worker's sender thread
# must wake at its rate slot, or the slot is given up (docs/llm.md), while a run that starts a
# second later costs nothing. On the 2-core test machine a run process takes 3-4.5 s of CPU to
# start, during which the workers' slots were missed most (docs/benchmarks.md).
ORCHESTRATION_NICENESS = 5


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


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def choose_code_server_port(settings: Settings) -> int:
    """The code server's port for this LUMIKB_HOME: the one recorded in `run/code-server.port` while
    it is free or this installation's code server holds it, else a new free port (then recorded).
    Two installations on one host never share a code server."""
    path = run_dir(settings) / "code-server.port"
    try:
        recorded = int(path.read_text().strip())
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and (_port_is_free(recorded) or read_pid(settings, "code-server") is not None):
        return recorded
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    make_private_dir(run_dir(settings))
    path.write_text(str(port))
    return port


def write_workspace(settings: Settings, host: str = "127.0.0.1", port: int | None = None) -> Path:
    """The workspace the webserver and the daemon load: the code server of `lumikb up`."""
    port = choose_code_server_port(settings) if port is None else port
    path = settings.home_dir / "workspace.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    workspace = {"load_from": [{"grpc_server": {"host": host, "port": port, "location_name": LOCATION_NAME}}]}
    path.write_text(yaml.safe_dump(workspace, sort_keys=False))
    return path


def worker_argv(queue: Queue, settings: Settings, loglevel: str = "INFO") -> list[str]:
    """The Celery worker command for one queue: bounded concurrency and memory, and, with
    `LUMIKB_WORKER_AUTOSCALE_MIN`, a pool that shrinks to that many processes when the queue is empty."""
    concurrency = (
        settings.document_processing_concurrency
        if queue == QUEUE_DOCUMENT_PROCESSING
        else settings.reprocessing_concurrency
    )
    pool = ["-c", str(concurrency)]
    if settings.worker_autoscale_min is not None:
        pool += ["--autoscale", f"{concurrency},{settings.worker_autoscale_min}"]
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP_MODULE, "worker",
        "-Q", queue,
        "-n", f"{queue}@%h",
        *pool,
        "--prefetch-multiplier", "1",
        "--max-memory-per-child", str(settings.worker_max_memory_kb),
        "--max-tasks-per-child", str(settings.worker_max_tasks_per_child),
        "-l", loglevel,
    ]


def service_specs(
    settings: Settings,
    workspace: Path,
    *,
    code_server_port: int | None = None,
    webserver: bool = True,
) -> list[ServiceSpec]:
    """Every process of a local deployment, in start order."""
    if code_server_port is None:
        code_server_port = choose_code_server_port(settings)
    specs = [
        ServiceSpec(
            "code-server",
            # `code-server start` (not `api grpc`) so that a reload imports the definitions again:
            # `lumikb schedule set-cron` relies on it to rebuild the drift schedule on the new cron.
            [_bin("dagster"), "code-server", "start", "-m", DEFINITIONS_MODULE, "-h", "127.0.0.1",
             "-p", str(code_server_port), "--location-name", LOCATION_NAME],
            niceness=ORCHESTRATION_NICENESS,
        ),
    ]
    if webserver:
        specs.append(
            ServiceSpec(
                "webserver",
                [_bin("dagster-webserver"), "-w", str(workspace), "-h", settings.webserver_host,
                 "-p", str(settings.webserver_port)],
                niceness=ORCHESTRATION_NICENESS,
            )
        )
    specs.append(ServiceSpec("daemon", [_bin("dagster-daemon"), "run", "-w", str(workspace)],
                             niceness=ORCHESTRATION_NICENESS))
    # Each worker under `respawn`: started again when it exits by itself (a Redis restart can end a
    # Celery worker), as the compose file's restart policy does in production.
    specs.extend(ServiceSpec(f"worker-{queue}", respawn_argv(worker_argv(queue, settings))) for queue in QUEUES)
    return specs


def service_env(
    settings: Settings, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of every process: the same settings everywhere, the broker resolved once."""
    env = dict(base if base is not None else os.environ)
    env["LUMIKB_HOME"] = str(settings.home_dir)
    env["DAGSTER_HOME"] = str(settings.effective_dagster_home)
    env["CELERY_BROKER_URL"] = broker_url(settings)
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


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_pid(settings: Settings, name: str, pid: int) -> None:
    """Record a process as `pid start-time`, so a later reader can tell it from a process that
    merely got the same pid after it ended."""
    make_private_dir(run_dir(settings))
    _pidfile(settings, name).write_text(f"{pid} {_start_time(pid) or ''}".strip())


def read_pid(settings: Settings, name: str) -> int | None:
    """The pid of a recorded process that is still that process: None when the pid file is missing,
    or the pid is gone or now belongs to another process (a different start time)."""
    path = _pidfile(settings, name)
    try:
        fields = path.read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    now = _start_time(pid)
    if len(fields) > 1 and now is not None and fields[1] != now:
        return None  # a stale pid file: the pid was reused by an unrelated process
    if len(fields) == 1 and not _is_ours(pid):
        return None
    return pid


def _is_ours(pid: int) -> bool:
    """A pid file of an older version (no start time): trust it only for a Dagster or Celery process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc: nothing better to go by
    return any(word in cmdline for word in ("dagster", "celery"))


def start_services(
    settings: Settings, specs: Sequence[ServiceSpec], env: Mapping[str, str]
) -> dict[str, subprocess.Popen[bytes]]:
    """Start each process (in its own session, output to its log file) unless it already runs."""
    make_private_dir(logs_dir(settings))
    make_private_dir(run_dir(settings))
    started: dict[str, subprocess.Popen[bytes]] = {}
    for spec in specs:
        if read_pid(settings, spec.name) is not None:
            continue
        log = open(logs_dir(settings) / f"{spec.name}.log", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**env, **spec.env}, start_new_session=True, cwd=str(settings.home_dir),
        )
        log.close()
        if spec.niceness:
            _lower_priority(process.pid, spec.niceness)
        write_pid(settings, spec.name, process.pid)
        started[spec.name] = process
        if spec.name == "code-server":
            wait_for_port("127.0.0.1", int(spec.argv[spec.argv.index("-p") + 1]), timeout_s=120, process=process)
    return started


def _lower_priority(pid: int, niceness: int) -> None:
    """Make `pid` `niceness` nicer than this process (its children inherit it). Raising a niceness
    needs no privilege; a process already at the bottom stays there."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness))
    except OSError:
        pass  # gone already: its own log says why


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until `process` (or, without one, anything) listens on host:port; raise when the process
    exits first, or when the port is held by another process (another installation's server)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(1)
            accepting = sock.connect_ex((host, port)) == 0
        if accepting:
            if process is None:
                return
            owners = listening_pids(port)
            if owners is None or any(_group_of(pid) == process.pid for pid in owners):
                return
            if owners:
                # Someone else's listener: connecting to it would use another installation's code.
                raise RuntimeError(f"port {port} on {host} is held by another process (pid "
                                   f"{', '.join(map(str, sorted(owners)))}), not by the one started here")
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def listening_pids(port: int) -> set[int] | None:
    """The pids with a TCP socket listening on `port` (Linux /proc), or None when that cannot be
    told (no /proc): the caller then trusts the connection alone. Processes of other users are not
    visible, so an empty set means "not one of ours"."""
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as handle:  # noqa: PTH123
                next(handle)
                for line in handle:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    pids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    pids.add(int(entry))
                    break
        except OSError:
            continue
    return pids


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def stop_services(settings: Settings, names: Sequence[str]) -> list[str]:
    """Stop the recorded processes (their whole process groups): SIGTERM, then SIGKILL after a
    grace period. Returns the names that were running.

    A stop ends when every process of a group has exited, not only its leader: a worker's children
    and the code server's gRPC server may outlive their leader. That gRPC server, which `dagster
    code-server start` runs on a Unix socket in TMPDIR (a path from Dagster's
    `safe_tempfile_path_unmanaged`), leaves the socket file behind unless its proxy's shutdown
    request reaches it, so the stop removes the socket files its processes were started with.
    """
    stopped = []
    pids = {name: read_pid(settings, name) for name in names}  # None for a stale pid file
    sockets: list[Path] = []
    for name, pid in pids.items():
        if pid is not None and _alive(pid):
            sockets += _socket_arguments(_group_members(pid))
            _signal_group(pid, signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name in stopped:
        pid = pids[name]
        assert pid is not None
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        # What outlives its leader gets a moment to exit: the code server's gRPC server, whose proxy
        # asks it to shut down, otherwise waits for its heartbeat to time out (30 s) and more.
        orphans_deadline = time.monotonic() + ORPHAN_GRACE_S
        while not _alive(pid) and _group_members(pid) and time.monotonic() < orphans_deadline:
            time.sleep(0.2)
        if _alive(pid) or _group_members(pid):
            _signal_group(pid, signal.SIGKILL)
            # SIGKILL is delivered, not waited for: a process ends when it is next scheduled, which
            # on a busy machine is not at once (a stop that returned then found the group alive).
            killed_deadline = time.monotonic() + KILL_WAIT_S
            while (_alive(pid) or _group_members(pid)) and time.monotonic() < killed_deadline:
                time.sleep(0.05)
    for path in sockets:
        if path.is_socket():
            path.unlink(missing_ok=True)
    for name in names:
        _pidfile(settings, name).unlink(missing_ok=True)
    return stopped


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid` (Linux /proc; none known without it)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state, _ppid, group = (entry / "stat").read_text().rsplit(") ", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _socket_arguments(pids: Sequence[int]) -> list[Path]:
    """The paths these processes were given as `--socket PATH` (Dagster's gRPC servers)."""
    paths = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        paths += [Path(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg == "--socket"]
    return paths


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
        states.append(ServiceState(name, pid, pid is not None, logs_dir(settings) / f"{name}.log"))
    return states


def service_names() -> list[str]:
    return ["code-server", "webserver", "daemon", *(f"worker-{queue}" for queue in QUEUES)]


def prepare_instance(settings: Settings) -> Path:
    """Write `dagster.yaml` if missing and apply the pool limits; returns the Dagster home."""
    from dagster import DagsterInstance

    pin_dagster_storage_driver()
    home = ensure_instance_config(settings)
    with DagsterInstance.from_config(str(home)) as instance:
        apply_pool_limits(instance, settings)
    return home


__all__ = [
    "QUEUE_REPROCESSING", "ServiceSpec", "ServiceState", "prepare_instance", "service_env", "service_names",
    "choose_code_server_port", "listening_pids", "read_pid", "service_specs", "service_states", "start_services",
    "stop_services", "wait_for_port", "worker_argv", "write_pid", "write_workspace",
]
