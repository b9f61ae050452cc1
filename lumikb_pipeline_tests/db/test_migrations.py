"""Migrations run up and down cleanly on PostgreSQL and SQLite, and match the models."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from lumikb_pipeline.db import migrate
from lumikb_pipeline.db.models import Base
from lumikb_pipeline.db.session import get_engine

TABLES = {
    "knowledge_bases", "schema_versions", "documents", "chunks", "extraction_records", "jobs",
    "chunk_checkpoints", "app_settings", "dagster_step_outputs",
}


def _tables(url: str) -> set[str]:
    return set(inspect(get_engine(url)).get_table_names()) - {"alembic_version"}


def _assert_round_trip(url: str) -> None:
    migrate.upgrade(url)
    assert _tables(url) == TABLES
    assert migrate.current_revision(url) == migrate.head_revision()
    with get_engine(url).connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], f"models and migrations disagree: {differences}"
    migrate.downgrade(url)
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES


def test_migrations_run_up_and_down_on_postgresql(empty_pg_url: str) -> None:
    _assert_round_trip(empty_pg_url)


def test_migrations_run_up_and_down_on_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _assert_round_trip(f"sqlite:///{tmp_path / 'app.sqlite3'}")


def test_embedded_sqlite_database_is_migrated_on_demand(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'fresh' / 'app.sqlite3'}"
    migrate.ensure_database(url)
    assert _tables(url) == TABLES
