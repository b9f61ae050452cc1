"""The graph store: one interface, two implementations (Neo4j and an embedded SQLite file).

Both honour the same contract (PRODUCT.md section 2, docs/graph-model.md): a document's contribution
is written in one transaction; `replace` makes it exactly the given graph and `merge` adds to it;
writing the same document twice changes nothing; entities and relationships exist only while some
chunk provides them; nothing crosses KBs. Both compute the changes with the same planner
(`graph.plan`) from the document's own records and bounded aggregates, so a write costs the same
whatever the number of documents naming the same entities; each applies them with its own queries,
and a differential test holds the two equal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from lumikb_pipeline.core.errors import LumikbError
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.graph.merging import text_order

INVARIANT_EXAMPLES = 5  # examples returned with each invariant count: enough to start a diagnosis


class InvalidDocumentGraph(LumikbError):
    """A document graph that breaks the store's structural rules (say which document and what); nothing
    of it was written. Type violations are `SchemaViolation` instead."""


class WriteSummary(BaseModel):
    """What one `write_document` or `remove_document` did.

    `chunks`, `entities`, `relationships` and `mentions` describe the document's contribution after
    the write; the other fields count the changes the write made to the graph.

    `newer_version_held` is set when the write was *refused*: the graph holds the document at that
    schema version, newer than the write's, and nothing was changed (writes are ordered by schema
    version, so a late write of an older extraction never replaces a newer one).
    """

    model_config = ConfigDict(frozen=True)

    kb_id: str
    doc_id: str
    mode: WriteMode
    chunks: int = 0
    entities: int = 0
    relationships: int = 0
    mentions: int = 0
    chunks_removed: int = 0
    mentions_removed: int = 0
    entities_created: int = 0
    entities_deleted: int = 0
    relationships_created: int = 0
    relationships_deleted: int = 0
    newer_version_held: int | None = None

    @property
    def refused(self) -> bool:
        """True when the write changed nothing because the graph holds a newer schema version."""
        return self.newer_version_held is not None


class GraphCounts(BaseModel):
    """Sizes of one KB's graph."""

    model_config = ConfigDict(frozen=True)

    documents: int = 0
    chunks: int = 0
    entities: int = 0
    relationships: int = 0
    mentions: int = 0


class DocumentCounts(BaseModel):
    """Sizes of one document's contribution: its chunks, the entities its chunks mention, the
    relationships that list one of its chunks, and its MENTIONS edges."""

    model_config = ConfigDict(frozen=True)

    chunks: int = 0
    entities: int = 0
    relationships: int = 0
    mentions: int = 0


class InvariantReport(BaseModel):
    """The result of one invariant query: how many violations, and a few of them described."""

    model_config = ConfigDict(frozen=True)

    name: str
    count: int
    examples: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.count == 0


class GraphDump(BaseModel):
    """Every node and relationship of one KB with all their properties, in a stable order.

    Nodes are `{"labels": [...], "properties": {...}}`; relationships are
    `{"type": ..., "start": <node id>, "end": <node id>, "properties": {...}}` where a node id is the
    label followed by its identifying properties. Two dumps are equal exactly when the graphs are.
    """

    model_config = ConfigDict(frozen=True)

    nodes: list[dict[str, Any]]
    relationships: list[dict[str, Any]]

    @classmethod
    def build(
        cls,
        nodes: Iterable[tuple[Sequence[str], Mapping[str, Any]]],
        relationships: Iterable[
            tuple[str, Sequence[str], Mapping[str, Any], Sequence[str], Mapping[str, Any], Mapping[str, Any]]
        ],
    ) -> GraphDump:
        """A dump from (labels, properties) nodes and (type, start labels, start properties, end
        labels, end properties, properties) relationships, in canonical order."""
        node_rows = [{"labels": sorted(labels), "properties": dict(props)} for labels, props in nodes]
        rel_rows = [
            {
                "type": rel_type,
                "start": _node_id(start_labels, start),
                "end": _node_id(end_labels, end),
                "properties": dict(props),
            }
            for rel_type, start_labels, start, end_labels, end, props in relationships
        ]
        return cls(nodes=sorted(node_rows, key=_canonical), relationships=sorted(rel_rows, key=_canonical))


def relationship_properties(
    rel_type: Any, kb_id: Any, description: Any, sources: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    """A relationship's properties as a dump shows them. The provenance lists are computed here, at
    read time, from the relationship's records (one per chunk and description): they are never
    stored on the relationship, where every write would rewrite them.

    `source_chunk_ids[i]` and `source_descriptions[i]` are one record each, sorted by chunk id, then
    description; `chunk_ids` are the unique chunk ids, sorted (both in `merging.text_order`)."""
    pairs = sorted(set(sources), key=lambda s: (text_order(s[0]), text_order(s[1])))
    return {
        "type": rel_type,
        "kb_id": kb_id,
        "description": description,
        "chunk_ids": sorted({cid for cid, _ in pairs}, key=text_order),
        "source_chunk_ids": [cid for cid, _ in pairs],
        "source_descriptions": [desc for _, desc in pairs],
    }


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _node_id(labels: Sequence[str], props: Mapping[str, Any]) -> str:
    """A readable, unique name of a node: its label and identifying properties."""
    if "Entity" in labels:
        parts = [props.get("kb_id"), props.get("type"), props.get("key")]
    elif "Document" in labels or "Chunk" in labels:
        parts = [props.get("kb_id"), props.get("id")]
    else:
        parts = [_canonical(dict(props))]
    return _canonical([":".join(sorted(labels)), *parts])


@runtime_checkable
class GraphStore(Protocol):
    """Where documents' entity graphs live. Safe to use from several processes at once."""

    def ensure_schema(self) -> None:
        """Create the constraints, indexes or tables the store needs; idempotent."""
        ...

    def write_document(self, graph: DocumentGraph, schema: DomainSchema, mode: WriteMode) -> WriteSummary:
        """Write one document's contribution in one transaction.

        The graph records the schema version each document was written at; a write at an older
        version than the recorded one is refused (nothing changes) and says so in
        `WriteSummary.newer_version_held`. A write at the same or a newer version proceeds.

        Raises `SchemaViolation` (a type not in `schema`) or `InvalidDocumentGraph` before anything
        is written.
        """
        ...

    def remove_document(self, kb_id: str, doc_id: str) -> WriteSummary:
        """Remove a (deleted) document and exactly what only it contributed; idempotent."""
        ...

    def counts(self, kb_id: str) -> GraphCounts:
        """Sizes of one KB's graph."""
        ...

    def document_counts(self, kb_id: str, doc_id: str) -> DocumentCounts:
        """Sizes of one document's contribution."""
        ...

    def duplicate_entities(self, kb_id: str) -> InvariantReport:
        """Entities that share (kb_id, type, key)."""
        ...

    def duplicate_relationships(self, kb_id: str) -> InvariantReport:
        """Relationships that share (type, source, target)."""
        ...

    def entities_without_provenance(self, kb_id: str) -> InvariantReport:
        """Entities no chunk of their KB mentions."""
        ...

    def relationships_without_provenance(self, kb_id: str) -> InvariantReport:
        """Relationships with no chunk ids, or naming a chunk that is not in their KB."""
        ...

    def edges_across_kbs(self, kb_id: str) -> InvariantReport:
        """Edges (or references) between an element of this KB and an element of another KB."""
        ...

    def dump(self, kb_id: str) -> GraphDump:
        """Every node and relationship of one KB with all properties (tests, debugging, exports)."""
        ...

    def close(self) -> None:
        """Release what this store holds."""
        ...


def check_invariants(store: GraphStore, kb_id: str) -> list[InvariantReport]:
    """All invariant queries of PRODUCT.md section 2 for one KB, in a fixed order."""
    return [
        store.duplicate_entities(kb_id),
        store.duplicate_relationships(kb_id),
        store.entities_without_provenance(kb_id),
        store.relationships_without_provenance(kb_id),
        store.edges_across_kbs(kb_id),
    ]
