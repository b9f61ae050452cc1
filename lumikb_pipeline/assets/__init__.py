"""The asset graph: `document_entities` (per-document extraction, partitioned by document), the
`knowledge_graph` it feeds (with the invariant checks), and `kb_schema_drift` (the drift check's
numbers)."""

from lumikb_pipeline.assets.document_entities import DOCUMENT_ENTITIES, document_entities
from lumikb_pipeline.assets.graph_checks import KNOWLEDGE_GRAPH, graph_invariants, knowledge_graph
from lumikb_pipeline.assets.partitions import documents_partitions
from lumikb_pipeline.assets.schema_drift import kb_schema_drift

__all__ = [
    "DOCUMENT_ENTITIES",
    "KNOWLEDGE_GRAPH",
    "document_entities",
    "documents_partitions",
    "graph_invariants",
    "kb_schema_drift",
    "knowledge_graph",
]
