"""What the resource-bound tests and `benchmarks/memory.py` read off running processes: a Celery
worker group (its parent and prefork children), their memory and CPU, and the connections they hold
to PostgreSQL, Redis and Neo4j, each counted on the server's own listing.

A connection is attributed to a process by its client port: the servers list the client address of
each connection (`pg_stat_activity.client_port`, `CLIENT LIST addr=`, Neo4j's
`dbms.listConnections()` `clientAddress`, which Neo4j 5 Community has) and psutil lists the local
ports of a process's TCP sockets. Other helpers' and tests' connections to the same servers are so
left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from lumikb_pipeline.orchestration import respawn


def celery_parent(pid: int) -> psutil.Process:
    """The Celery parent of the worker `lumikb up` started as `pid`: the process itself, or, for a
    worker run under `orchestration.respawn`, the wrapper's child (asked each time: a respawned
    worker is a new process)."""
    process = psutil.Process(pid)
    if respawn.__name__ in process.cmdline():
        children = process.children()
        if not children:
            raise psutil.NoSuchProcess(pid, msg="the respawn wrapper has no worker right now")
        return children[0]
    return process


def worker_group(parent_pid: int) -> list[psutil.Process]:
    """The Celery parent and its (prefork) children, those still alive."""
    try:
        parent = celery_parent(parent_pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass(frozen=True)
class GroupSample:
    """RSS of one worker group at one moment (bytes): the parent's, each prefork child's (by pid),
    and the sum of the processes further down (a step's helpers, e.g. Dagster's compute-log `tail`s)."""

    parent_rss: int
    children_rss: dict[int, int]
    helpers_rss: int = 0

    @property
    def total(self) -> int:
        return self.parent_rss + sum(self.children_rss.values()) + self.helpers_rss


def sample_group(parent_pid: int) -> GroupSample | None:
    try:
        parent = celery_parent(parent_pid)
        parent_rss = parent.memory_info().rss
        children = parent.children()
        everything = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    direct = {child.pid for child in children}
    children_rss: dict[int, int] = {}
    helpers = 0
    for process in everything:
        try:
            rss = process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        if process.pid in direct:
            children_rss[process.pid] = rss
        else:
            helpers += rss
    return GroupSample(parent_rss, children_rss, helpers)


def group_cpu_seconds(parent_pid: int) -> float:
    """User + system CPU seconds of the group's live processes (children counted while alive)."""
    total = 0.0
    for process in worker_group(parent_pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def local_ports(pids: Iterable[int]) -> set[int]:
    """The local ports of the TCP sockets the processes hold."""
    ports: set[int] = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ports.update(conn.laddr.port for conn in connections if conn.laddr)
    return ports


def postgres_connections(database_url: str, database: str, ports: set[int]) -> int:
    """Connections to `database` listed by `pg_stat_activity` whose client port is in `ports`."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(database_url).set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        rows = conn.execute("SELECT client_port FROM pg_stat_activity WHERE datname = %s", (database,)).fetchall()
    return sum(1 for (port,) in rows if port in ports)


def redis_connections(redis_url: str, ports: set[int]) -> int:
    """Clients listed by Redis's `CLIENT LIST` whose address's port is in `ports`."""
    return sum(redis_connections_by_name(redis_url, ports).values())


def redis_connections_by_name(redis_url: str, ports: set[int]) -> dict[str, int]:
    """Those clients counted by the name they gave themselves (`infra.redis_client.CLIENT_NAME`
    and `LLM_CLIENT_NAME`; Celery's connections have none: `""`)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        clients: list[dict[str, Any]] = list(client.client_list())  # type: ignore[arg-type]
    finally:
        client.close()
    counts: dict[str, int] = {}
    for entry in clients:
        if int(str(entry.get("addr", ":0")).rsplit(":", 1)[1]) in ports:
            name = str(entry.get("name", ""))
            counts[name] = counts.get(name, 0) + 1
    return counts


def neo4j_connections(ports: set[int]) -> int:
    """Bolt connections listed by Neo4j's `dbms.listConnections()` whose client port is in `ports`."""
    from neo4j import GraphDatabase

    auth = (os.environ.get("LUMIKB_NEO4J_USER", "neo4j"), os.environ["LUMIKB_NEO4J_PASSWORD"])
    with GraphDatabase.driver(os.environ["LUMIKB_NEO4J_URI"], auth=auth) as driver:
        records, _, _ = driver.execute_query("CALL dbms.listConnections() YIELD clientAddress RETURN clientAddress")
    return sum(1 for record in records if int(str(record["clientAddress"]).rsplit(":", 1)[1]) in ports)


__all__ = [
    "GroupSample", "group_cpu_seconds", "local_ports", "neo4j_connections", "postgres_connections",
    "celery_parent", "redis_connections", "redis_connections_by_name", "sample_group", "worker_group",
]
