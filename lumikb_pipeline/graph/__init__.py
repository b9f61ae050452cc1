"""The entity graph: building a document's contribution and storing it (Neo4j or embedded).

`build_document_graph` turns chunk extractions into a `DocumentGraph`; a `GraphStore` (from
`open_graph_store`) writes it with `replace` or `merge` semantics. See docs/graph-model.md.
"""

from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.store import (
    DocumentCounts,
    GraphCounts,
    GraphDump,
    GraphStore,
    InvalidDocumentGraph,
    InvariantReport,
    WriteMode,
    WriteSummary,
    check_invariants,
    open_graph_store,
)

__all__ = [
    "DocumentCounts",
    "GraphCounts",
    "GraphDump",
    "GraphStore",
    "InvalidDocumentGraph",
    "InvariantReport",
    "WriteMode",
    "WriteSummary",
    "build_document_graph",
    "check_invariants",
    "open_graph_store",
]
