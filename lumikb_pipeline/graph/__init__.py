"""The entity graph: building a document's contribution and storing it (Neo4j or embedded).

`build_document_graph` turns chunk extractions into a `DocumentGraph`; a `GraphStore` (from
`open_graph_store`, the one place that chooses between the two stores) writes it with `replace` or
`merge` semantics. See docs/graph-model.md. The Neo4j store is `graph.neo4j_store.Neo4jGraphStore`.
"""

from __future__ import annotations

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.store import (
    DocumentCounts,
    GraphCounts,
    GraphDump,
    GraphStore,
    InvalidDocumentGraph,
    InvariantReport,
    WriteSummary,
    check_invariants,
)


def open_graph_store(settings: Settings) -> GraphStore:
    """The configured graph store: Neo4j when `LUMIKB_NEO4J_URI` is set, else the embedded store
    (`graph.sqlite3` under `LUMIKB_HOME`). The schema is ensured before the store is returned."""
    store: GraphStore
    if settings.neo4j_uri:
        # Imported here: the Neo4j driver (and numpy, which it loads) costs about 0.5 s of CPU to
        # import, paid by every Dagster run process, which never writes the graph (steps do).
        from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore

        password = settings.neo4j_password.get_secret_value() if settings.neo4j_password else ""
        store = Neo4jGraphStore(
            settings.neo4j_uri, settings.neo4j_user, password, database=settings.neo4j_database
        )
    else:
        store = EmbeddedGraphStore(settings.home_dir / "graph.sqlite3")
    store.ensure_schema()
    return store


__all__ = [
    "DocumentCounts",
    "EmbeddedGraphStore",
    "GraphCounts",
    "GraphDump",
    "GraphStore",
    "InvalidDocumentGraph",
    "InvariantReport",
    "WriteSummary",
    "build_document_graph",
    "check_invariants",
    "open_graph_store",
]
