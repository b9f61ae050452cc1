"""Checks a document graph must pass before any store opens a transaction for it.

Type checks raise `SchemaViolation` (the type is not in the KB's schema version); structural checks
raise `InvalidDocumentGraph`. Both name the document and say what to do; nothing is written.
"""

from __future__ import annotations

from lumikb_pipeline.core.errors import SchemaViolation
from lumikb_pipeline.domain.keys import MAX_KEY_LENGTH, normalise_key
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.domain.schema import (
    ENTITY_TYPE_PATTERN,
    KB_SLUG_PATTERN,
    RELATIONSHIP_TYPE_PATTERN,
    DomainSchema,
)
from lumikb_pipeline.graph.store import InvalidDocumentGraph

# Names and descriptions beyond this are refused rather than silently cut: 64 k characters is far
# beyond any real extraction and keeps one document's transaction a sane size.
MAX_TEXT_LENGTH = 65_536
# Ids are indexed (part of uniqueness constraints), whose entries are limited to a few kB.
MAX_ID_LENGTH = 512


def _allowed(names: list[str]) -> str:
    return ", ".join(sorted(names)) or "(none)"


def _text_problem(value: str, limit: int) -> str | None:
    """Why `value` cannot be stored, or None."""
    if value.isascii() and len(value) <= limit:  # the common case, decided in two C calls
        return None
    if len(value) > limit:
        return f"is {len(value)} characters long; at most {limit} are accepted"
    try:  # only non-ASCII text can hold a lone surrogate
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate); fix the text at its source"
    return None


def _provenance_problem(provenance: list[str], chunk_ids: set[str]) -> str | None:
    """Why a chunk-id list is not valid provenance within the document, or None."""
    if not provenance:
        return "lists no chunk it came from"
    if chunk_ids.issuperset(provenance):
        return None
    unknown = sorted(set(provenance) - chunk_ids)
    if unknown:
        return (
            f"names chunk(s) {', '.join(map(repr, unknown[:3]))} that are not among the document's chunks; "
            "list every chunk of the document in the graph"
        )
    return None


def check_types(graph: DocumentGraph, schema: DomainSchema) -> None:
    """Raise `SchemaViolation` naming the document, the type and the allowed types for the first
    entity or relationship whose type (or endpoint types) the schema does not allow."""
    where = f"document {graph.doc_id} (KB {graph.kb_id}, schema version {graph.schema_version})"
    entity_type_names = schema.entity_type_names
    rel_types = {r.name: r for r in schema.relationship_types}
    entity_types, relationship_types = sorted(entity_type_names), sorted(rel_types)
    nothing = "; nothing of this document was written"
    # Each distinct type (and endpoint combination) is checked once: a document repeats a few types.
    for entity_type in {entity.type for entity in graph.entities}:
        if entity_type not in entity_type_names:
            raise SchemaViolation(
                f"{where}: entity type {entity_type!r} is not in the schema; "
                f"allowed entity types: {_allowed(entity_types)}{nothing}"
            )
        if not ENTITY_TYPE_PATTERN.match(entity_type):
            # A schema built in code (not parsed from a file) could hold a malformed name.
            raise SchemaViolation(
                f"{where}: entity type {entity_type!r} does not match {ENTITY_TYPE_PATTERN.pattern}{nothing}"
            )
    for name, source_type, target_type in {(r.type, r.source.type, r.target.type) for r in graph.relationships}:
        rel_type = rel_types.get(name)
        if rel_type is None:
            raise SchemaViolation(
                f"{where}: relationship type {name!r} is not in the schema; "
                f"allowed relationship types: {_allowed(relationship_types)}{nothing}"
            )
        if not RELATIONSHIP_TYPE_PATTERN.match(name):
            # The type becomes a Neo4j relationship type, so this pattern is a safety check too.
            raise SchemaViolation(
                f"{where}: relationship type {name!r} does not match "
                f"{RELATIONSHIP_TYPE_PATTERN.pattern}{nothing}"
            )
        if source_type not in rel_type.source or target_type not in rel_type.target:
            raise SchemaViolation(
                f"{where}: relationship type {name!r} from {source_type!r} to {target_type!r} "
                f"is not allowed; {name} goes from [{_allowed(list(rel_type.source))}] "
                f"to [{_allowed(list(rel_type.target))}]{nothing}"
            )


def check_structure(graph: DocumentGraph) -> None:
    """Raise `InvalidDocumentGraph` when the graph is not a well-formed contribution: bad KB slug or
    ids, keys that are not normalised, repeated entities or relationships, provenance naming chunks
    that are not the document's, relationship endpoints that are not among its entities."""
    doc = graph.doc_id or "(empty id)"

    def fail(what: str, problem: str) -> InvalidDocumentGraph:
        return InvalidDocumentGraph(f"document {doc}: {what} {problem}")

    if not KB_SLUG_PATTERN.match(graph.kb_id):
        raise fail(f"KB id {graph.kb_id!r}", "is not a valid KB slug")
    if not graph.doc_id:
        raise InvalidDocumentGraph("a document graph has an empty document id")
    if problem := _text_problem(graph.doc_id, MAX_ID_LENGTH):
        raise fail("the document id", problem)

    chunk_ids: set[str] = set()
    for chunk in graph.chunks:
        if not chunk.id or chunk.id in chunk_ids:
            raise fail(f"chunk id {chunk.id!r}", "is empty or repeated")
        if problem := _text_problem(chunk.id, MAX_ID_LENGTH):
            raise fail(f"chunk id {chunk.id[:40]!r}", problem)
        chunk_ids.add(chunk.id)

    # Descriptions of the offending item are only formatted when something is wrong (hot path).
    refs: set[tuple[str, str]] = set()
    for entity in graph.entities:
        ref = (entity.type, entity.key)
        problem = None
        if not entity.key or len(entity.key) > MAX_KEY_LENGTH or normalise_key(entity.key) != entity.key:
            problem = "has a key that is not normalised; build keys with lumikb_pipeline.domain.keys.normalise_key"
        elif ref in refs:
            problem = "is listed twice; merge it into one entity"
        elif name_problem := _text_problem(entity.name, MAX_TEXT_LENGTH):
            problem = f"has a name that {name_problem}"
        elif description_problem := _text_problem(entity.description, MAX_TEXT_LENGTH):
            problem = f"has a description that {description_problem}"
        else:
            problem = _provenance_problem(entity.chunk_ids, chunk_ids)
        if problem:
            raise fail(f"entity {entity.type}:{entity.key[:60]!r}", problem)
        refs.add(ref)

    rel_keys: set[tuple[str, str, str, str, str]] = set()
    for rel in graph.relationships:
        source, target = (rel.source.type, rel.source.key), (rel.target.type, rel.target.key)
        rel_key = (rel.type, *source, *target)
        if rel_key in rel_keys:
            problem = "is listed twice; merge it into one"
        elif source not in refs or target not in refs:
            problem = "has an endpoint that is not among the document's entities"
        elif description_problem := _text_problem(rel.description, MAX_TEXT_LENGTH):
            problem = f"has a description that {description_problem}"
        else:
            problem = _provenance_problem(rel.chunk_ids, chunk_ids)
        if problem:
            raise fail(
                f"relationship {rel.type} from {source[0]}:{source[1][:40]!r} to {target[0]}:{target[1][:40]!r}",
                problem,
            )
        rel_keys.add(rel_key)


def foreign_chunks_error(kb_id: str, doc_id: str, foreign: list[tuple[str, str]]) -> InvalidDocumentGraph:
    """The error for chunk ids of the new graph that another document of the KB already owns
    (found by the store inside its transaction, which the error then rolls back)."""
    examples = ", ".join(f"{chunk_id!r} (document {owner})" for chunk_id, owner in foreign[:3])
    return InvalidDocumentGraph(
        f"document {doc_id}: chunk id(s) already belong to another document of KB {kb_id}: {examples}; "
        "chunk ids must be unique within a KB"
    )


def validate_document_graph(graph: DocumentGraph, schema: DomainSchema, mode: str = WriteMode.REPLACE) -> None:
    """All checks a store runs before writing `graph`; raises before any transaction is opened."""
    if mode not in tuple(WriteMode):
        raise ValueError(f"mode must be one of {', '.join(WriteMode)}, not {mode!r}")
    check_types(graph, schema)
    check_structure(graph)
