"""Shared fixtures: real PostgreSQL, Redis and Neo4j from `scripts/services`.

A missing service is a failure with instructions, never a skip: the suite is meant to run against
the real servers (`eval "$(scripts/services env)"` after `scripts/services up`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from lumikb_pipeline.db.models import Base
from lumikb_pipeline.db.session import dispose_engines, get_engine
from lumikb_pipeline_tests.fake_llm import DEFAULT_CONFIG, FakeServer, start_fake_server, stop_fake_server

SERVICES_HINT = 'start the services with `scripts/services up` and `eval "$(scripts/services env)"`'
# Read once, before any fixture clears the LUMIKB_ variables for a test of the embedded defaults.
_SERVICES_ENV = {name: value for name, value in os.environ.items() if name.startswith(("LUMIKB_", "CELERY_"))}


def required_env(name: str) -> str:
    """The value of a variable that `scripts/services env` sets; fail loudly when it is missing."""
    value = _SERVICES_ENV.get(name)
    if not value:
        pytest.fail(f"{name} is not set: {SERVICES_HINT}")
    return value


def create_postgres_database(prefix: str = "t") -> str:
    """Create an empty PostgreSQL database for one test; return its SQLAlchemy URL."""
    import psycopg

    base = make_url(required_env("LUMIKB_DATABASE_URL"))
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = base.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return base.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    """Drop a database that `create_postgres_database` made. When it is an app database, the graphs of
    its KBs are removed from the shared Neo4j first: nothing would refer to them afterwards."""
    import psycopg

    from lumikb_pipeline_tests.graph.conftest import delete_graphs_of

    delete_graphs_of(url)
    dispose_engines()
    parsed = make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')


@pytest.fixture
def empty_pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (no tables)."""
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture
def pg_url(empty_pg_url: str) -> str:
    """A fresh PostgreSQL database with the app's tables."""
    Base.metadata.create_all(get_engine(empty_pg_url))
    return empty_pg_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite database with the app's tables."""
    url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    Base.metadata.create_all(get_engine(url))
    yield url
    dispose_engines()


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The app database on each supported backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
        Base.metadata.create_all(get_engine(url))
        yield url
        dispose_engines()
    else:
        url = create_postgres_database()
        Base.metadata.create_all(get_engine(url))
        yield url
        drop_postgres_database(url)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The real Redis, on a database number reserved for tests and flushed before and after."""
    import redis

    base = required_env("LUMIKB_REDIS_URL")
    url = base.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def lumikb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private LUMIKB_HOME with every LUMIKB_ variable cleared (embedded defaults); the embedded
    Redis a test started there is stopped afterwards."""
    for name in list(os.environ):
        if name.startswith("LUMIKB_") or name in ("CELERY_BROKER_URL", "DAGSTER_HOME"):
            monkeypatch.delenv(name)
    home = tmp_path / "lumikb-home"
    monkeypatch.setenv("LUMIKB_HOME", str(home))
    from lumikb_pipeline.core.config import get_settings

    get_settings.cache_clear()
    yield home
    from lumikb_pipeline.infra.redis_client import stop_embedded_redis

    stop_embedded_redis(home)


@pytest.fixture(scope="session")
def fake_llm_session() -> Iterator[FakeServer]:
    server = start_fake_server()
    yield server
    stop_fake_server(server)


@pytest.fixture
def fake_llm(fake_llm_session: FakeServer) -> FakeServer:
    """The fake LLM server (one process per test session), reset and with default behaviour."""
    fake_llm_session.reset()
    fake_llm_session.configure(**DEFAULT_CONFIG)
    return fake_llm_session
