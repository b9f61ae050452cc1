"""Migrations run up and down cleanly on PostgreSQL and SQLite, match the models, and give existing
documents their partition keys."""

from datetime import UTC, datetime, timedelta

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from lumikb_pipeline.db import migrate
from lumikb_pipeline.db.models import Base, Document
from lumikb_pipeline.db.session import get_engine, session_scope
from lumikb_pipeline.domain.partition_keys import is_valid_partition_key

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


def _add_documents_at_0001(url: str) -> dict[str, str]:
    """A KB with documents as revision 0001 stored them (no partition key); returns {id: title}."""
    documents = {
        "3f9c2a1b-9155-45e1-8619-73a882625b59": "Master Services Agreement",
        "3f9c2a1b-0000-4000-8000-000000000002": "Master services agreement!",  # same slug, same short id
        "77aa0000-0000-4000-8000-000000000003": "契約書",
        "88bb0000-0000-4000-8000-000000000004": "",
        "99cc0000-0000-4000-8000-000000000005": "a...b, [c] | d\x07" + "x" * 400,
    }
    now = datetime(2026, 11, 1, tzinfo=UTC)
    with get_engine(url).begin() as connection:
        connection.execute(text(
            "INSERT INTO knowledge_bases (id, slug, name, current_schema_version, created_at) "
            "VALUES (1, 'legal', 'Legal', 1, :now)"), {"now": now})
        for offset, (doc_id, title) in enumerate(documents.items()):
            connection.execute(text(
                "INSERT INTO documents (id, kb_id, title, source, content_hash, revision, created_at, updated_at) "
                "VALUES (:id, 1, :title, :source, 'h', 1, :created, :created)"),
                {"id": doc_id, "title": title, "source": f"/corpus/file-{offset}.md",
                 "created": now + timedelta(seconds=offset)})
    return documents


def _assert_existing_documents_get_their_keys(url: str) -> None:
    migrate.upgrade(url, "0001")
    documents = _add_documents_at_0001(url)
    migrate.upgrade(url)
    with session_scope(url) as session:
        keys = dict(session.execute(select(Document.id, Document.partition_key)).tuples().all())
    assert keys == {
        "3f9c2a1b-9155-45e1-8619-73a882625b59": "legal/master-services-agreement-3f9c2a1b",
        # the second one of that title takes more digits of its id
        "3f9c2a1b-0000-4000-8000-000000000002": "legal/master-services-agreement-3f9c2a1b0000",
        "77aa0000-0000-4000-8000-000000000003": "legal/file-2-77aa0000",  # no Latin letters: the file name
        "88bb0000-0000-4000-8000-000000000004": "legal/file-3-88bb0000",
        "99cc0000-0000-4000-8000-000000000005": "legal/a-b-c-d-99cc0000",
    }
    assert set(keys) == set(documents) and all(is_valid_partition_key(key) for key in keys.values())
    # A document created after the migration gets its key at insert, unique beside the migrated ones.
    with session_scope(url) as session:
        session.add(Document(id="3f9c2a1b-1111-4000-8000-000000000006", kb_id=1, title="Master Services Agreement",
                             source="/corpus/new.md", content_hash="h"))
    with session_scope(url) as session:
        assert session.get_one(Document, "3f9c2a1b-1111-4000-8000-000000000006").partition_key == (
            "legal/master-services-agreement-3f9c2a1b1111")
    migrate.downgrade(url, "0001")
    assert "partition_key" not in {c["name"] for c in inspect(get_engine(url)).get_columns("documents")}


def test_existing_documents_get_their_partition_keys_on_postgresql(empty_pg_url: str) -> None:
    _assert_existing_documents_get_their_keys(empty_pg_url)


def test_existing_documents_get_their_partition_keys_on_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _assert_existing_documents_get_their_keys(f"sqlite:///{tmp_path / 'app.sqlite3'}")
