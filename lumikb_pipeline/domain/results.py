"""Typed values that flow one way: chunk (`ChunkInput`) -> LLM extraction -> document graph -> graph store.

`ChunkExtraction` is what the extractor returns for one chunk (validated against the schema);
`DocumentGraph` is what the graph store writes for one document in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class ChunkInput:
    """One chunk to extract: its id, its text and the hash of its text (the checkpoint key)."""

    id: str
    text: str
    content_hash: str


class ExtractedEntity(BaseModel):
    """An entity as the LLM named it in one chunk (validated: known type, non-empty name)."""

    model_config = ConfigDict(frozen=True)

    name: str
    type: str
    description: str = ""


class ExtractedRelationship(BaseModel):
    """A relationship between two entities named in the same chunk, by name and type."""

    model_config = ConfigDict(frozen=True)

    source: str
    source_type: str
    target: str
    target_type: str
    type: str
    description: str = ""


class DroppedItem(BaseModel):
    """An item of the LLM's answer that failed validation, kept for counting and diagnosis."""

    model_config = ConfigDict(frozen=True)

    kind: str  # "entity" | "relationship"
    reason: str  # e.g. "unknown_type", "endpoint_not_allowed", "empty_name"
    detail: str = ""


class ChunkExtraction(BaseModel):
    """The validated extraction of one chunk; this is also what a chunk checkpoint stores."""

    chunk_id: str
    entities: list[ExtractedEntity] = Field(default_factory=list)
    relationships: list[ExtractedRelationship] = Field(default_factory=list)
    dropped: list[DroppedItem] = Field(default_factory=list)
    from_checkpoint: bool = False
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class ChunkFailure(BaseModel):
    """A chunk whose extraction failed after its retries, with the reason (never a secret)."""

    chunk_id: str
    reason: str
    llm_calls: int = 0


class GraphChunk(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    ordinal: int


class EntityRef(BaseModel):
    """The identity of an entity within a KB: its type and normalised key."""

    model_config = ConfigDict(frozen=True)

    type: str
    key: str


class GraphEntity(BaseModel):
    type: str
    key: str
    name: str
    description: str
    chunk_ids: list[str]


class GraphRelationship(BaseModel):
    type: str
    source: EntityRef
    target: EntityRef
    description: str
    chunk_ids: list[str]


class DocumentGraph(BaseModel):
    """One document's whole contribution to the graph at one schema version."""

    kb_id: str
    doc_id: str
    schema_version: int
    chunks: list[GraphChunk]
    entities: list[GraphEntity] = Field(default_factory=list)
    relationships: list[GraphRelationship] = Field(default_factory=list)
