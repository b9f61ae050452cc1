"""Fixtures of the graph-store tests: each contract test runs against Neo4j and the embedded store.

The Neo4j database is shared (other suites and engineers use it), so tests never wipe it: each test
writes into KBs with fresh random slugs and deletes exactly those KBs afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline_tests.conftest import SERVICES_HINT, required_env


def neo4j_store() -> Neo4jGraphStore:
    """A store on the real Neo4j of `scripts/services`; fails (never skips) when it is not there."""
    from neo4j.exceptions import AuthError, ServiceUnavailable

    store = Neo4jGraphStore(
        required_env("LUMIKB_NEO4J_URI"),
        required_env("LUMIKB_NEO4J_USER"),
        required_env("LUMIKB_NEO4J_PASSWORD"),
        database=os.environ.get("LUMIKB_NEO4J_DATABASE") or "neo4j",
    )
    try:
        store.ensure_schema()
    except (ServiceUnavailable, AuthError) as exc:
        pytest.fail(f"Neo4j does not answer ({exc}): {SERVICES_HINT}")
    return store


# Each label's nodes of one KB, found through its uniqueness constraint's composite index (an
# equality on `kb_id` is a seek only with the other key properties named too).
KB_NODES = {
    "Entity": "(n:Entity {kb_id: $kb_id} WHERE n.type IS NOT NULL AND n.key IS NOT NULL)",
    "Chunk": "(n:Chunk {kb_id: $kb_id} WHERE n.id IS NOT NULL)",
    "Document": "(n:Document {kb_id: $kb_id} WHERE n.id IS NOT NULL)",
}


def delete_kbs(store: Neo4jGraphStore, kb_ids: Iterable[str]) -> None:
    """Remove every node and edge of these KBs from the shared Neo4j database.

    Batched, so that a KB of any size goes in bounded memory: the entities' relationships first (a hub
    entity's `DETACH DELETE` in one transaction would hold every edge of it, beyond Neo4j's
    transaction memory pool at 100,000 documents), then the nodes. `CALL … IN TRANSACTIONS` needs an
    auto-commit transaction, so `session.run`. The patterns are the literals above.
    """
    entity = KB_NODES["Entity"]
    with store._driver.session(database=store.database) as session:
        for kb_id in kb_ids:
            for pattern in (f"{entity}-[r]->()", f"{entity}<-[r]-()"):
                session.run(f"MATCH {pattern} CALL (r) {{ DELETE r }} IN TRANSACTIONS OF 5000 ROWS",
                            kb_id=kb_id).consume()
            for nodes in KB_NODES.values():
                session.run(f"MATCH {nodes} CALL (n) {{ DETACH DELETE n }} IN TRANSACTIONS OF 2000 ROWS",
                            kb_id=kb_id).consume()


def delete_graphs_of(app_database_url: str) -> None:
    """Remove from Neo4j the graph of every KB of an app database that is about to be dropped (a test's,
    a stack's, a benchmark's: `conftest.drop_postgres_database` calls this), so that the shared Neo4j
    does not keep what nothing refers to any more. Nothing to do for a database without the app's
    tables, or one that is gone. Its pooled connections stay for the caller's `dispose_engines`."""
    from sqlalchemy import inspect, select
    from sqlalchemy.exc import OperationalError

    from lumikb_pipeline.db.models import KnowledgeBase
    from lumikb_pipeline.db.session import get_engine

    if not os.environ.get("LUMIKB_NEO4J_URI"):
        return
    try:
        with get_engine(app_database_url).connect() as connection:
            migrated = inspect(connection).has_table(KnowledgeBase.__tablename__)
            slugs = list(connection.scalars(select(KnowledgeBase.slug))) if migrated else []
    except OperationalError:  # the database does not exist (dropped already)
        slugs = []
    if slugs:
        delete_kbs(neo4j_store(), slugs)


@pytest.fixture(params=["neo4j", "embedded"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_kb_factory() -> Iterator[Callable[[], str]]:
    """Fresh KB slugs; whatever a test wrote into them in Neo4j is deleted after the test."""
    made: list[str] = []

    def new_kb() -> str:
        slug = f"t-{uuid.uuid4().hex[:12]}"
        made.append(slug)
        return slug

    yield new_kb
    if made and os.environ.get("LUMIKB_NEO4J_URI"):
        delete_kbs(neo4j_store(), made)


@pytest.fixture
def kb_id(new_kb_factory: Callable[[], str]) -> str:
    return new_kb_factory()


@pytest.fixture
def graph_store(store_kind: str, tmp_path: Path) -> Iterator[GraphStore]:
    """The store under test: Neo4j (real server) or embedded (a fresh SQLite file)."""
    store: GraphStore = neo4j_store() if store_kind == "neo4j" else EmbeddedGraphStore(tmp_path / "graph.sqlite3")
    store.ensure_schema()
    yield store
    store.close()
