"""Schema migrations of the app database (Alembic, scripts in `lumikb_pipeline/migrations`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from lumikb_pipeline.db.session import get_engine
from lumikb_pipeline.errors import LumikbError
from lumikb_pipeline.scrub import scrub

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would mangle a '%' in a password.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Revert migrations down to `revision`."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    try:
        with get_engine(url).connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise LumikbError(f"cannot reach the app database {scrub(url)}: {scrub(str(exc.orig))}") from None


def ensure_database(url: str) -> None:
    """Make the app database usable: migrate the embedded SQLite one automatically; for a server
    database, refuse with the command to run if it is not at the newest migration."""
    if current_revision(url) == head_revision():
        return
    if make_url(url).get_backend_name() == "sqlite":
        upgrade(url)
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
