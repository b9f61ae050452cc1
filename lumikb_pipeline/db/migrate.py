"""Schema migrations of the app database (Alembic, scripts in `lumikb_pipeline/db/migrations`)."""

from __future__ import annotations

import fcntl
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from lumikb_pipeline.core.errors import LumikbError
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db.session import get_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would mangle a '%' in a password.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`; an unreachable database is a one-line LumikbError."""
    try:
        with migration_lock(url):
            command.upgrade(alembic_config(url), revision)
    except OperationalError as exc:
        raise LumikbError(f"cannot reach the app database {scrub(url)}: {_first_line(exc)}") from None


def _first_line(exc: OperationalError) -> str:
    return scrub(str(exc.orig)).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__


def downgrade(url: str, revision: str = "base") -> None:
    """Revert migrations down to `revision`."""
    with migration_lock(url):
        command.downgrade(alembic_config(url), revision)


# One key for every process migrating this application's database (pg_advisory_lock takes a bigint).
_PG_LOCK_KEY = zlib.crc32(b"lumikb_pipeline.migrations")


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Serialise migrations across processes: a file lock beside a SQLite database, a session-level
    `pg_advisory_lock` on PostgreSQL. Commands started at once on a fresh database then migrate it
    once, one after the other, instead of racing to create the same tables."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            yield
            return
        lock_path = Path(parsed.database + ".migrate.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(lock_path, "a") as handle:  # noqa: PTH123
            lock_path.chmod(0o600)
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with get_engine(url).connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    try:
        with get_engine(url).connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise LumikbError(f"cannot reach the app database {scrub(url)}: {_first_line(exc)}") from None


def ensure_database(url: str) -> None:
    """Make the app database usable: migrate the embedded SQLite one automatically; for a server
    database, refuse with the command to run if it is not at the newest migration."""
    if current_revision(url) == head_revision():
        return
    if make_url(url).get_backend_name() == "sqlite":
        upgrade(url)  # under the migration lock: a second process finds the work done
        return
    raise LumikbError("the app database is not up to date; run `lumikb db upgrade` first")


_READY: set[str] = set()


def _has_app_tables(url: str) -> bool:
    from sqlalchemy import inspect

    from lumikb_pipeline.db.models import Job, KnowledgeBase

    try:
        with get_engine(url).connect() as connection:
            inspector = inspect(connection)
            return all(inspector.has_table(str(table.__tablename__)) for table in (KnowledgeBase, Job))
    except OperationalError as exc:
        raise LumikbError(f"cannot reach the app database {scrub(url)}: {scrub(str(exc.orig))}") from None


def require_database(url: str, home: Path) -> None:
    """Refuse, with one message naming `LUMIKB_HOME`, an app database that does not exist or holds no
    lumikb tables (a Dagster process started with another `LUMIKB_HOME` than the one `lumikb demo` or
    `lumikb up` used); never creates one. Checked once per process and database while it is ready."""
    if url in _READY:
        return
    parsed = make_url(url)
    problem = None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        if not Path(parsed.database).is_file():
            problem = "does not exist"
    if problem is None and not _has_app_tables(url):
        problem = "has no lumikb tables"
    if problem is not None:
        raise LumikbError(
            f"the app database {scrub(url)} {problem}: this process's LUMIKB_HOME is {home}. Start Dagster with "
            "the LUMIKB_HOME (and LUMIKB_DATABASE_URL, if any) that `lumikb demo` or `lumikb up` used, "
            "e.g. the command `lumikb demo` prints, or create the database with `lumikb db upgrade`."
        )
    _READY.add(url)
