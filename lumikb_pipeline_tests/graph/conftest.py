"""Fixtures of the graph-store tests: each contract test runs against Neo4j and the embedded store.

The Neo4j database is shared (other suites and engineers use it), so tests never wipe it: each test
writes into KBs with fresh random slugs and deletes exactly those KBs afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline_tests.conftest import SERVICES_HINT, required_env

KB_LABELS = ("Document", "Chunk", "Entity")


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


def delete_kbs(store: Neo4jGraphStore, kb_ids: list[str]) -> None:
    """Remove every node (and so every edge) of these KBs from the shared Neo4j database."""
    for label in KB_LABELS:
        store._driver.execute_query(  # the test owns these KBs; the label is one of three literals
            f"MATCH (n:{label}) WHERE n.kb_id IN $kb_ids DETACH DELETE n",
            kb_ids=kb_ids,
            database_=store.database,
        )


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
