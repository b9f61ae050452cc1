"""Aggregate the chunk extractions of one document into the document's graph contribution.

Pure: no I/O, and the result depends only on the *content* of the inputs, not on their order, so a
re-run over the same checkpoints yields the same `DocumentGraph`.

Decisions (see docs/graph-model.md):
- An entity is identified by (type, `normalise_key(name)`); a name whose key is empty is no entity.
- The displayed name is the whitespace-collapsed name given in most chunks (ties: smallest text);
  the description is the sorted unique descriptions joined (`merging.merge_descriptions`).
- A relationship is keyed by (type, source ref, target ref) and lists the chunks it came from.
- A relationship endpoint that the same chunk did not also extract as an entity is *added* as an
  entity mentioned by that chunk (with no description): the extractor validated its type, and the
  chunk names it, so the chunk is genuine provenance. A relationship whose endpoint name has an empty
  key is dropped.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from lumikb_pipeline.domain.keys import normalise_key
from lumikb_pipeline.domain.results import (
    ChunkExtraction,
    DocumentGraph,
    EntityRef,
    GraphChunk,
    GraphEntity,
    GraphRelationship,
)
from lumikb_pipeline.graph.merging import choose_name, merge_descriptions
from lumikb_pipeline.graph.store import InvalidDocumentGraph


@dataclass
class _EntityParts:
    names_by_chunk: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    descriptions: set[str] = field(default_factory=set)


@dataclass
class _RelationshipParts:
    chunk_ids: set[str] = field(default_factory=set)
    descriptions: set[str] = field(default_factory=set)


def _display_name(name: str) -> str:
    return " ".join(name.split())


def build_document_graph(
    kb_id: str,
    doc_id: str,
    schema_version: int,
    chunks: list[GraphChunk],
    extractions: list[ChunkExtraction],
) -> DocumentGraph:
    """One document's contribution to the graph, from its chunks and their validated extractions.

    Every chunk of the document is listed (also those with nothing extracted, so that a `replace`
    write removes what they used to provide). Raises `InvalidDocumentGraph` when an extraction names
    a chunk that is not one of `chunks`, or two chunks share an id.
    """
    chunk_ids = [chunk.id for chunk in chunks]
    if len(set(chunk_ids)) != len(chunk_ids):
        repeated = sorted(cid for cid, n in Counter(chunk_ids).items() if n > 1)
        raise InvalidDocumentGraph(f"document {doc_id}: chunk ids repeated: {', '.join(repeated[:5])}")
    known = set(chunk_ids)

    entities: dict[EntityRef, _EntityParts] = defaultdict(_EntityParts)
    relationships: dict[tuple[str, EntityRef, EntityRef], _RelationshipParts] = defaultdict(_RelationshipParts)

    for extraction in extractions:
        chunk_id = extraction.chunk_id
        if chunk_id not in known:
            raise InvalidDocumentGraph(
                f"document {doc_id}: an extraction names chunk {chunk_id!r}, which is not one of the "
                "document's chunks; re-chunk the document or drop the stale checkpoint"
            )
        for entity in extraction.entities:
            key = normalise_key(entity.name)
            if not key:
                continue
            parts = entities[EntityRef(type=entity.type, key=key)]
            parts.names_by_chunk[chunk_id].add(_display_name(entity.name))
            parts.descriptions.add(entity.description)
        for rel in extraction.relationships:
            source_key, target_key = normalise_key(rel.source), normalise_key(rel.target)
            if not source_key or not target_key:
                continue
            source = EntityRef(type=rel.source_type, key=source_key)
            target = EntityRef(type=rel.target_type, key=target_key)
            # The endpoint is mentioned by this chunk even if the extractor did not list it as an
            # entity; recording it keeps "every relationship's chunk mentions both ends" true.
            entities[source].names_by_chunk[chunk_id].add(_display_name(rel.source))
            entities[target].names_by_chunk[chunk_id].add(_display_name(rel.target))
            rel_parts = relationships[(rel.type, source, target)]
            rel_parts.chunk_ids.add(chunk_id)
            rel_parts.descriptions.add(rel.description)

    graph_entities = []
    for ref in sorted(entities, key=lambda r: (r.type, r.key)):
        parts = entities[ref]
        names: Counter[str] = Counter()
        for chunk_names in parts.names_by_chunk.values():
            names.update(chunk_names)
        graph_entities.append(
            GraphEntity(
                type=ref.type,
                key=ref.key,
                name=choose_name(names),
                description=merge_descriptions(parts.descriptions),
                chunk_ids=sorted(parts.names_by_chunk),
            )
        )
    def rel_order(item: tuple[tuple[str, EntityRef, EntityRef], _RelationshipParts]) -> tuple[str, ...]:
        rel_type, source, target = item[0]
        return (rel_type, source.type, source.key, target.type, target.key)

    graph_relationships = [
        GraphRelationship(
            type=rel_type,
            source=source,
            target=target,
            description=merge_descriptions(parts.descriptions),
            chunk_ids=sorted(parts.chunk_ids),
        )
        for (rel_type, source, target), parts in sorted(relationships.items(), key=rel_order)
    ]
    return DocumentGraph(
        kb_id=kb_id,
        doc_id=doc_id,
        schema_version=schema_version,
        chunks=sorted(chunks, key=lambda c: (c.ordinal, c.id)),
        entities=graph_entities,
        relationships=graph_relationships,
    )
