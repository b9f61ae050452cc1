"""`open_graph_store` picks the store from the settings, in one place."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.graph import open_graph_store
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore, shared_driver
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline_tests.conftest import required_env


def test_without_a_neo4j_uri_the_embedded_store_lives_under_the_home(tmp_path: Path) -> None:
    store = open_graph_store(Settings(home=tmp_path / "home", neo4j_uri=None))
    assert isinstance(store, EmbeddedGraphStore) and isinstance(store, GraphStore)
    assert store.path == (tmp_path / "home" / "graph.sqlite3").resolve()
    assert store.path.exists()  # the schema is ensured on open
    assert store.counts("any").documents == 0


def test_with_a_neo4j_uri_the_store_is_neo4j_and_shares_one_driver_per_process() -> None:
    settings = Settings(
        neo4j_uri=required_env("LUMIKB_NEO4J_URI"),
        neo4j_user=required_env("LUMIKB_NEO4J_USER"),
        neo4j_password=SecretStr(required_env("LUMIKB_NEO4J_PASSWORD")),
    )
    first, second = open_graph_store(settings), open_graph_store(settings)
    assert isinstance(first, Neo4jGraphStore) and isinstance(second, Neo4jGraphStore)
    assert first._driver is second._driver
    assert first._driver is shared_driver(
        required_env("LUMIKB_NEO4J_URI"), required_env("LUMIKB_NEO4J_USER"), required_env("LUMIKB_NEO4J_PASSWORD")
    )
    first.close()
    assert second.counts("no-such-kb").entities == 0  # closing one store leaves the driver usable
