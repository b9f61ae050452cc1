"""The servers from `scripts/services` are the real ones, answer, and listen on loopback only.

A missing variable or a server that does not answer is a failure with instructions, never a skip.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

SERVICES_HINT = 'run `scripts/services up` and then `eval "$(scripts/services env)"`'

# Ports fixed by scripts/services.
SERVICE_PORTS = {"postgres": 55432, "redis": 56379, "neo4j": 57687}

# /proc/net/tcp{,6} state code for LISTEN.
TCP_LISTEN = "0A"


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: {SERVICES_HINT}")
    return value


def test_graph_server_is_real_neo4j_over_bolt() -> None:
    import neo4j

    uri = _env("LUMIKB_NEO4J_URI")
    assert uri.startswith("bolt://"), uri
    auth = (_env("LUMIKB_NEO4J_USER"), _env("LUMIKB_NEO4J_PASSWORD"))
    database = os.environ.get("LUMIKB_NEO4J_DATABASE") or "neo4j"
    try:
        with neo4j.GraphDatabase.driver(uri, auth=auth, connection_timeout=10) as driver:
            records, _, _ = driver.execute_query("CALL dbms.components()", database_=database)
    except neo4j.exceptions.ServiceUnavailable as exc:
        pytest.fail(f"Neo4j at {uri} does not answer ({exc}): {SERVICES_HINT}")

    components = {r["name"]: r for r in records}
    assert "Neo4j Kernel" in components, records
    kernel = components["Neo4j Kernel"]
    assert kernel["versions"] and kernel["versions"][0].startswith("5."), kernel
    assert kernel["edition"] == "community", kernel


def test_postgres_answers() -> None:
    import psycopg

    url = _env("LUMIKB_DATABASE_URL").replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("select version()").fetchone()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {url} does not answer ({exc}): {SERVICES_HINT}")
    assert row is not None and row[0].startswith("PostgreSQL "), row


def test_redis_answers() -> None:
    import redis

    url = _env("LUMIKB_REDIS_URL")
    client = redis.Redis.from_url(url, socket_connect_timeout=10)
    try:
        assert client.ping() is True
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis at {url} does not answer ({exc}): {SERVICES_HINT}")
    finally:
        client.close()


def _listening_addresses() -> dict[int, set[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Local addresses of every TCP socket in LISTEN state, by port, from /proc/net/tcp{,6}."""
    found: dict[int, set[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != TCP_LISTEN:
                continue
            hex_addr, hex_port = fields[1].split(":")
            # The kernel prints the address as 32-bit words in host (little-endian) order.
            raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, len(hex_addr), 8))
            found.setdefault(int(hex_port, 16), set()).add(ipaddress.ip_address(raw))
    return found


def _is_loopback(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is an IPv6 socket bound to 127.0.0.1
    return addr.is_loopback


def test_services_listen_only_on_loopback() -> None:
    listening = _listening_addresses()
    missing = [f"{name} ({port})" for name, port in SERVICE_PORTS.items() if port not in listening]
    assert not missing, f"nothing listens for {', '.join(missing)}: {SERVICES_HINT}"
    for name, port in SERVICE_PORTS.items():
        exposed = sorted(str(a) for a in listening[port] if not _is_loopback(a))
        assert not exposed, f"{name} listens on {exposed} for port {port}; only 127.0.0.1/::1 are allowed"
