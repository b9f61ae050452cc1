"""A whole local deployment for the integration tests, as real processes: the processes of
`lumikb up` (Dagster code server, webserver, daemon, one Celery worker per queue) on a fresh
PostgreSQL app database and a fresh PostgreSQL Dagster database (reached through the services'
PgBouncer, as production's), Redis, Neo4j, and the fake LLM server (with a fault injector).
Sensor intervals are shortened; everything else is production's.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis
from sqlalchemy.engine import make_url

from lumikb_pipeline.testing.fake_llm_server import raise_priority
from lumikb_pipeline_tests.conftest import create_postgres_database, drop_postgres_database, required_env

T = TypeVar("T")

# Pool limits below what the workload asks for, so the pool test is binding: the pool test starts 4
# document_processing runs together on a worker that could run 4 steps at once (-c 4), so 4 extract
# and then 4 write steps want the 3 slots of each pool and the pool, not the worker, holds them.
# Re-extraction may hold at most 2 slots of a pool (LUMIKB_MAX_REPROCESSING_RUNS, which the settings
# keep below both limits), so normal processing always has one (test 3).
POOL_LIMITS = {"lumikb_llm": 3, "lumikb_graph_write": 3}


def services_unset() -> str | None:
    """Why a stack cannot start here (the services' variables are not set), or None when it can."""
    if os.environ.get("LUMIKB_REDIS_URL") and os.environ.get("LUMIKB_NEO4J_URI"):
        return None
    return 'the services are not set: run `scripts/services up` and `eval "$(scripts/services env)"`'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout_s: float, interval_s: float = 1.0, what: str = "condition",
               explain: Callable[[], str] | None = None) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout_s`, and
    with what `explain` says about the state then (e.g. a sensor's last ticks)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}"
                                 + (f"\n{explain()}" if explain else ""))
        time.sleep(interval_s)


def sensor_ticks(instance: Any, name: str, limit: int = 10) -> str:
    """A sensor's stored status and its last ticks (time, status, skip reason or error), newest first."""
    from datetime import UTC, datetime

    from dagster._core.scheduler.instigation import InstigatorType

    lines = []
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.name != name:
            continue
        lines.append(f"sensor {name}: {state.status.value}")
        for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=limit):
            at = datetime.fromtimestamp(tick.timestamp, UTC).strftime("%H:%M:%S")
            detail = tick.error.message.strip()[:500] if tick.error else (tick.skip_reason or "")
            lines.append(f"  {at} {tick.status.value} {detail}")
    return "\n".join(lines) or f"sensor {name}: no stored state"


@dataclass
class Stack:
    """A running deployment and what a test needs to drive it."""

    root: Path
    env: dict[str, str]
    app_db_url: str
    dagster_db_url: str
    llm_url: str
    webserver_url: str
    redis_dbs: tuple[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    llm_process: subprocess.Popen[bytes] | None = None
    # How each process of `lumikb up` was started, so a test can kill one and start it again.
    specs: dict[str, Any] = field(default_factory=dict)
    process_env: dict[str, str] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return Path(self.env["LUMIKB_HOME"])

    def instance(self) -> Any:
        from dagster import DagsterInstance

        return DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def lumikb(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the `lumikb` command line with the stack's environment."""
        return subprocess.run(
            [sys.executable, "-c", "from lumikb_pipeline.cli import app; app()", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def poison(self, marker: str | None, times: int = -1) -> dict[str, Any]:
        return dict(httpx.post(f"{self.llm_url}/_poison", json={"marker": marker, "times": times}).json())

    def hold_llm(self, hold: bool | None = None) -> dict[str, Any]:
        """Hold every LLM request until `hold_llm(False)`; returns `{"hold", "waiting"}` (None: just read)."""
        if hold is None:
            return dict(httpx.get(f"{self.llm_url}/_hold").json())
        return dict(httpx.post(f"{self.llm_url}/_hold", json={"hold": hold}).json())

    def configure_llm(self, **changes: Any) -> dict[str, Any]:
        """Change the fake LLM server's behaviour (`FakeConfig` fields: latency, 429 and 5xx shares)."""
        return dict(httpx.post(f"{self.llm_url}/_config", json=changes).json())

    def llm_calls(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.llm_url}/_calls").json()["calls"])

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(f"{self.webserver_url}/graphql", json={"query": query, "variables": variables or {}},
                              timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body, body["errors"]
        return dict(body["data"])

    def kill(self, name: str) -> int:
        """SIGKILL a process of `lumikb up` with its whole process group (a Celery worker's children
        too), as a crash does; returns its pid."""
        process = self.processes[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return process.pid

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start a killed process of `lumikb up` again, as `lumikb up --detach` does (same command,
        same environment, same log file)."""
        from lumikb_pipeline.core.config import load_settings
        from lumikb_pipeline.orchestration import processes

        with stack_environment(self):
            started = processes.start_services(load_settings(), [self.specs[name]], self.process_env)
        self.processes.update(started)
        return started[name]

    def log(self, name: str) -> str:
        path = self.home / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def stack_env(root: Path, app_db_url: str, dagster_db_url: str, llm_url: str, web_port: int,
              redis_dbs: tuple[str, str], overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMIKB_", "DAGSTER_", "CELERY_"))}
    env.update({
        "LUMIKB_HOME": str(root / "home"),
        "DAGSTER_HOME": str(root / "home" / "dagster"),
        "LUMIKB_DATABASE_URL": app_db_url,
        "LUMIKB_DAGSTER_PG_URL": dagster_db_url,
        "LUMIKB_REDIS_URL": redis_dbs[0],
        "CELERY_BROKER_URL": redis_dbs[1],
        "LUMIKB_NEO4J_URI": required_env("LUMIKB_NEO4J_URI"),
        "LUMIKB_NEO4J_USER": os.environ.get("LUMIKB_NEO4J_USER", "neo4j"),
        "LUMIKB_NEO4J_PASSWORD": required_env("LUMIKB_NEO4J_PASSWORD"),
        "LUMIKB_NEO4J_DATABASE": os.environ.get("LUMIKB_NEO4J_DATABASE", "neo4j"),
        "LUMIKB_LLM_MODEL": "openai/gpt-4o-mini",
        "LUMIKB_LLM_API_BASE": f"{llm_url}/v1",
        "LUMIKB_LLM_API_KEY": "sk-test-stack",
        # A rate the 2-core test machine can keep: the extractor sends each call at its rate slot and
        # re-queues a call that missed its slot, which a loaded machine does at high rates.
        "LUMIKB_LLM_RATE_LIMIT": "25/s",
        "LUMIKB_LLM_MAX_IN_FLIGHT": "8",
        "LUMIKB_LLM_MAX_ATTEMPTS": "2",
        # A poisoned document (500 to its every call, forever) fails after its attempts, not after
        # production's 10 minutes of waiting the "outage" out.
        "LUMIKB_LLM_RETRY_WINDOW_S": "0",
        "LUMIKB_REEXTRACT_BATCH_SIZE": "40",
        # Sensors look often so the tests are quick; the rest is production's configuration.
        "LUMIKB_PARTITIONS_SENSOR_INTERVAL_S": "3",
        "LUMIKB_SCHEMA_SENSOR_INTERVAL_S": "3",
        "LUMIKB_DRIFT_SENSOR_INTERVAL_S": "5",
        "LUMIKB_JOB_STATUS_SENSOR_INTERVAL_S": "3",
        "LUMIKB_LLM_POOL_LIMIT": str(POOL_LIMITS["lumikb_llm"]),
        "LUMIKB_GRAPH_WRITE_POOL_LIMIT": str(POOL_LIMITS["lumikb_graph_write"]),
        "LUMIKB_MAX_CONCURRENT_RUNS": "10",
        "LUMIKB_MAX_REPROCESSING_RUNS": "2",
        "LUMIKB_DOCUMENT_PROCESSING_CONCURRENCY": "4",
        "LUMIKB_REPROCESSING_CONCURRENCY": "2",
        "LUMIKB_WEBSERVER_PORT": str(web_port),
        "PYTHONUNBUFFERED": "1",
        # Every process's temp files in a folder of the stack's (test_resource_bounds: none are left).
        "TMPDIR": str(root / "tmp"),
    })
    env.update(overrides or {})
    return env


def dagster_url(sqlalchemy_url: str) -> str:
    """The stack's Dagster database as Dagster reaches it: through the services' PgBouncer when
    `LUMIKB_DAGSTER_PG_URL` names one (`scripts/services env` does), as production should."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql+psycopg2")
    if via := os.environ.get("LUMIKB_DAGSTER_PG_URL"):
        pooler = make_url(via)
        url = url.set(host=pooler.host, port=pooler.port)
    return url.render_as_string(hide_password=False)


def _start_llm(env: Mapping[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    out = open(log, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "lumikb_pipeline_tests.dagster.faulty_llm", "--port", "0"],
        stdout=subprocess.PIPE, stderr=out, env=dict(env), start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line.startswith("listening on "):
        process.kill()
        raise AssertionError(f"the fake LLM server did not start: {line!r}; see {log}")
    raise_priority(process.pid)  # its arrival times are what the saturation tests count
    return process, line.removeprefix("listening on ")


def _worker_ready(stack: Stack, queue: str) -> bool:
    return "ready." in stack.log(f"worker-{queue}")


@dataclass
class StackHandle:
    stack: Stack


@contextmanager
def stack_environment(stack: Stack) -> Iterator[None]:
    """This process's environment (and the settings read from it) point at `stack` inside the block."""
    from lumikb_pipeline.core.config import get_settings

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(stack.env)
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


def start_stack(
    root: Path, overrides: Mapping[str, str] | None = None, app_database_via: tuple[str, int] | None = None,
    redis_via: tuple[str, int] | None = None,
) -> Stack:
    """Create the databases, write the instance, start every process and wait until all answer.
    `overrides` replace some of `stack_env`'s variables (a test module's own rates and sizes);
    `app_database_via` (host, port) is where the stack reaches its app database instead of the
    machine's PostgreSQL (the chaos suite's proxy; the Dagster storage is not behind it), and
    `redis_via` where its processes reach Redis (broker, results, limiter) instead of the machine's
    (`Stack.redis_dbs` stay the direct URLs)."""
    from lumikb_pipeline.db import migrate
    from lumikb_pipeline.infra.dagster_instance import apply_pool_limits, instance_config, render_instance_yaml
    from lumikb_pipeline.orchestration import processes

    base_redis = required_env("LUMIKB_REDIS_URL").rsplit("/", 1)[0]
    redis_dbs = (f"{base_redis}/12", f"{base_redis}/13")
    for url in redis_dbs:
        redis.Redis.from_url(url).flushdb()
    app_db = create_postgres_database("stack_app")
    dagster_db = dagster_url(create_postgres_database("stack_dagster"))
    migrate.upgrade(app_db)
    if app_database_via is not None:
        host, port = app_database_via
        app_db = make_url(app_db).set(host=host, port=port).render_as_string(hide_password=False)

    redis_env = redis_dbs
    if redis_via is not None:
        host, port = redis_via
        redis_env = tuple(urlunsplit(urlsplit(url)._replace(netloc=f"{host}:{port}")) for url in redis_dbs)  # type: ignore[assignment]

    (root / "tmp").mkdir(parents=True, exist_ok=True)
    base_env = stack_env(root, app_db, dagster_db, "http://127.0.0.1:0", free_port(), redis_env, overrides)
    llm_process, llm_url = _start_llm(base_env, root / "fake-llm.log")
    env = stack_env(root, app_db, dagster_db, llm_url, int(base_env["LUMIKB_WEBSERVER_PORT"]), redis_env, overrides)
    stack = Stack(root, env, app_db, dagster_db, llm_url, f"http://127.0.0.1:{env['LUMIKB_WEBSERVER_PORT']}",
                  redis_dbs, llm_process=llm_process)

    # A start that fails half-way leaves no process and no database behind.
    try:
        # Settings and instance as `lumikb up` makes them, with the test intervals.
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            from lumikb_pipeline.core.config import load_settings

            settings = load_settings()
            home = settings.effective_dagster_home
            home.mkdir(parents=True, exist_ok=True)
            config = instance_config(settings, postgres=True, dequeue_interval_s=1, monitoring_poll_interval_s=5)
            (home / "dagster.yaml").write_text(render_instance_yaml(config))
            with stack.instance() as instance:
                apply_pool_limits(instance, settings)
            code_port = free_port()
            workspace = processes.write_workspace(settings, port=code_port)
            specs = processes.service_specs(settings, workspace, code_server_port=code_port)
            stack.specs = {spec.name: spec for spec in specs}
            stack.process_env = processes.service_env(settings, env)
            stack.processes = processes.start_services(settings, specs, stack.process_env)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        processes.wait_for_port("127.0.0.1", int(env["LUMIKB_WEBSERVER_PORT"]), timeout_s=180,
                                process=stack.processes["webserver"])
        for queue in ("document_processing", "reprocessing"):
            wait_until(lambda q=queue: _worker_ready(stack, q), 180, what=f"the {queue} worker")  # type: ignore[misc]
        wait_until(lambda: "SensorDaemon" in stack.log("daemon"), 180, what="the daemon")
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    """Stop every process of the stack and drop its databases (the app database's KBs' graphs in Neo4j
    with it)."""
    from lumikb_pipeline.orchestration import processes

    saved = dict(os.environ)
    os.environ.update(stack.env)
    try:
        from lumikb_pipeline.core.config import load_settings

        processes.stop_services(load_settings(), processes.service_names())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if stack.llm_process is not None:
        stack.llm_process.terminate()
        stack.llm_process.wait(timeout=10)
    for url in stack.redis_dbs:
        redis.Redis.from_url(url).flushdb()
    drop_postgres_database(stack.app_db_url)
    drop_postgres_database(make_url(stack.dagster_db_url).set(drivername="postgresql+psycopg").render_as_string(
        hide_password=False))


def unique_slug(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


__all__ = [
    "POOL_LIMITS", "Iterator", "Stack", "dagster_url", "sensor_ticks", "services_unset", "stack_environment",
    "start_stack", "stop_stack", "unique_slug", "wait_until",
]
