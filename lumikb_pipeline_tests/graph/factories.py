"""Small builders of schemas, extractions and document graphs for the graph tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lumikb_pipeline.domain.results import (
    ChunkExtraction,
    DocumentGraph,
    ExtractedEntity,
    ExtractedRelationship,
    GraphChunk,
)
from lumikb_pipeline.domain.schema import DomainSchema, EntityType, RelationshipType
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.store import GraphDump

SCHEMA = DomainSchema(
    entity_types=(
        EntityType(name="Organization", description="A company or institution."),
        EntityType(name="Person", description="A human being."),
        EntityType(name="Place", description="A city or country."),
    ),
    relationship_types=(
        RelationshipType(name="EMPLOYS", source=("Organization",), target=("Person",)),
        RelationshipType(name="LOCATED_IN", source=("Organization", "Person"), target=("Place",)),
    ),
)

# Entity spec: (name, type) or (name, type, description).
# Relationship spec: (source name, source type, TYPE, target name, target type) [+ description].
EntitySpec = tuple[str, ...]
RelSpec = tuple[str, ...]


def entity(spec: EntitySpec) -> ExtractedEntity:
    return ExtractedEntity(name=spec[0], type=spec[1], description=spec[2] if len(spec) > 2 else "")


def relationship(spec: RelSpec) -> ExtractedRelationship:
    return ExtractedRelationship(
        source=spec[0], source_type=spec[1], type=spec[2], target=spec[3], target_type=spec[4],
        description=spec[5] if len(spec) > 5 else "",
    )


def doc_graph(
    kb_id: str,
    doc_id: str,
    chunks: Sequence[tuple[Sequence[EntitySpec], Sequence[RelSpec]]],
    schema_version: int = 1,
) -> DocumentGraph:
    """A document graph built the production way (`build_document_graph`) from per-chunk specs.

    Chunk i of document D gets the id "D:i", so chunk ids are unique within a KB.
    """
    graph_chunks = [GraphChunk(id=f"{doc_id}:{i}", ordinal=i) for i in range(len(chunks))]
    extractions = [
        ChunkExtraction(
            chunk_id=f"{doc_id}:{i}",
            entities=[entity(e) for e in entities],
            relationships=[relationship(r) for r in rels],
        )
        for i, (entities, rels) in enumerate(chunks)
    ]
    return build_document_graph(kb_id, doc_id, schema_version, graph_chunks, extractions)


def without_kb(dump: GraphDump, kb_id: str) -> Any:
    """A dump with the KB slug blanked out, to compare the graphs of two KBs."""
    return json.loads(json.dumps(dump.model_dump()).replace(json.dumps(kb_id)[1:-1], "<kb>"))
