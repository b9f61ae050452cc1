"""Engines and sessions across a fork: a Celery prefork child never talks on its parent's connection."""

import os

from sqlalchemy import text

from lumikb_pipeline.db.session import session_scope


def _backend_pid(url: str) -> int:
    with session_scope(url) as session:
        return int(session.scalar(text("SELECT pg_backend_pid()")) or 0)


def test_a_forked_child_opens_its_own_connection_not_its_parents(pg_url: str) -> None:
    parent = _backend_pid(pg_url)  # its connection goes back to the parent's pool
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write, str(_backend_pid(pg_url)).encode())
        finally:
            os._exit(0)
    os.close(write)
    reply = os.read(read, 32)
    os.waitpid(child, 0)
    assert reply, "the child reported no connection"
    assert int(reply) != parent
    assert _backend_pid(pg_url) == parent  # the parent's pool is intact
