"""What a write must change, computed from what is stored: the write semantics, in Python.

The embedded store writes a document in three steps inside one transaction (the Neo4j store runs
the same semantics as one Cypher query, `neo4j_queries.WRITE_DOCUMENT`; a differential test holds
the two equal):
1. lock the document and read its *footprint* (its chunks, the entities they mention, the
   relationships that list one of them);
2. lock the touched entities, in one global order, and read their provenance from *every* document
   (`StoredState`);
3. apply the `WritePlan` that `plan_write` derives from the footprint, the state and the new graph.

Provenance records are the unit everything derives from. An entity's provenance is its MENTIONS
edges, each carrying the names and descriptions the mentioning chunk's document gave it; a
relationship's provenance is a set of (chunk id, description) pairs. An entity's `name` and
`description`, and a relationship's `chunk_ids` and `description`, are recomputed from the full set
of records with the rules of `graph.merging`, so they never depend on the order of writes, and an
element whose last record disappears is deleted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph, GraphRelationship
from lumikb_pipeline.graph.merging import choose_name, merge_descriptions, provenance_text, text_order
from lumikb_pipeline.graph.store import WriteSummary

# Plain tuples rather than `EntityRef` models: they are hashed and sorted thousands of times per
# write, and their natural order is the lock order.
Ref = tuple[str, str]
"""An entity's identity within a KB: (type, key)."""

RelKey = tuple[str, str, str, str, str]
"""A relationship's identity within a KB: (type, source type, source key, target type, target key)."""

Source = tuple[str, str]
"""One provenance record of a relationship: (chunk id, description given by that chunk's document)."""


def rel_key(rel: GraphRelationship) -> RelKey:
    return (rel.type, rel.source.type, rel.source.key, rel.target.type, rel.target.key)


@dataclass(frozen=True)
class Mention:
    """One MENTIONS edge: chunk -> entity, with what the chunk's document said about the entity."""

    chunk_id: str
    ref: Ref
    names: tuple[str, ...]
    descriptions: tuple[str, ...]


@dataclass(frozen=True)
class StoredEntity:
    name: str
    description: str


@dataclass(frozen=True)
class StoredRelationship:
    description: str
    chunk_ids: tuple[str, ...]
    sources: tuple[Source, ...]  # sorted


@dataclass
class Footprint:
    """What one document contributes now: read under the document's lock, before entity locks."""

    exists: bool = False
    chunks: dict[str, int] = field(default_factory=dict)  # chunk id -> ordinal
    refs: set[Ref] = field(default_factory=set)
    rel_keys: set[RelKey] = field(default_factory=set)


@dataclass
class StoredState:
    """The touched entities and relationships as stored, read while their entities are locked.

    `mentions` holds every MENTIONS edge of each touched entity, from any document.
    """

    mentions: dict[Ref, list[Mention]] = field(default_factory=dict)
    entities: dict[Ref, StoredEntity] = field(default_factory=dict)
    relationships: dict[RelKey, StoredRelationship] = field(default_factory=dict)


@dataclass
class WritePlan:
    """The changes to apply, each list sorted (a stable lock order for the Neo4j store)."""

    chunks_upsert: list[tuple[str, int]]
    chunks_delete: list[str]
    mentions_upsert: list[Mention]
    mentions_delete: list[tuple[str, Ref]]
    entities_upsert: list[tuple[Ref, StoredEntity]]
    entities_delete: list[Ref]
    relationships_upsert: list[tuple[RelKey, StoredRelationship]]
    relationships_delete: list[RelKey]
    delete_document: bool
    summary: WriteSummary


def touched_refs(footprint: Footprint, graph: DocumentGraph | None) -> list[Ref]:
    """Entities the write may change, sorted (a stable order for plans and locks)."""
    refs = set(footprint.refs)
    if graph is not None:
        refs.update((e.type, e.key) for e in graph.entities)
    return sorted(refs)


def touched_rel_keys(footprint: Footprint, graph: DocumentGraph | None) -> list[RelKey]:
    """Relationships the write may change, sorted."""
    keys = set(footprint.rel_keys)
    if graph is not None:
        keys.update(rel_key(r) for r in graph.relationships)
    return sorted(keys)


@dataclass
class _Contribution:
    chunks: dict[str, int] = field(default_factory=dict)
    mentions: dict[tuple[str, Ref], tuple[set[str], set[str]]] = field(default_factory=dict)
    sources: dict[RelKey, set[Source]] = field(default_factory=lambda: defaultdict(set))


def _new_contribution(graph: DocumentGraph | None) -> _Contribution:
    contribution = _Contribution()
    if graph is None:
        return contribution
    contribution.chunks = {c.id: c.ordinal for c in graph.chunks}
    for entity in graph.entities:
        ref = (entity.type, entity.key)
        descriptions = {entity.description} if entity.description.strip() else set()
        for chunk_id in entity.chunk_ids:
            contribution.mentions[(chunk_id, ref)] = ({entity.name}, set(descriptions))
    for rel in graph.relationships:
        description = provenance_text(rel.description)
        contribution.sources[rel_key(rel)].update((chunk_id, description) for chunk_id in rel.chunk_ids)
    return contribution


def plan_write(
    kb_id: str,
    doc_id: str,
    graph: DocumentGraph | None,
    mode: WriteMode,
    footprint: Footprint,
    state: StoredState,
) -> WritePlan:
    """The changes that make the document's contribution `graph` (replace) or its current
    contribution plus `graph` (merge). `graph=None` with mode "replace" removes the document."""
    doc_chunks = set(footprint.chunks) | ({c.id for c in graph.chunks} if graph else set())

    # The document's current contribution and everyone else's, split by chunk ownership.
    old = _Contribution(chunks=dict(footprint.chunks))
    others_mentions: dict[Ref, list[Mention]] = defaultdict(list)
    for ref, mentions in state.mentions.items():
        for mention in mentions:
            if mention.chunk_id in doc_chunks:
                old.mentions[(mention.chunk_id, ref)] = (set(mention.names), set(mention.descriptions))
            else:
                others_mentions[ref].append(mention)
    others_sources: dict[RelKey, set[Source]] = defaultdict(set)
    for key, rel in state.relationships.items():
        for source in rel.sources:
            (old.sources[key] if source[0] in doc_chunks else others_sources[key]).add(source)

    new = _new_contribution(graph)
    if mode == WriteMode.REPLACE:
        final = new
    else:
        final = _Contribution(chunks={**old.chunks, **new.chunks})
        for edge in old.mentions.keys() | new.mentions.keys():
            old_names, old_descriptions = old.mentions.get(edge, (set(), set()))
            new_names, new_descriptions = new.mentions.get(edge, (set(), set()))
            final.mentions[edge] = (old_names | new_names, old_descriptions | new_descriptions)
        for key in old.sources.keys() | new.sources.keys():
            final.sources[key] = old.sources.get(key, set()) | new.sources.get(key, set())

    chunks_delete = sorted(set(old.chunks) - set(final.chunks))
    chunks_upsert = sorted(
        (cid, ordinal) for cid, ordinal in final.chunks.items() if old.chunks.get(cid) != ordinal
    )

    final_mentions = {
        edge: Mention(chunk_id=edge[0], ref=edge[1], names=tuple(sorted(names, key=text_order)),
                      descriptions=tuple(sorted(descriptions, key=text_order)))
        for edge, (names, descriptions) in final.mentions.items()
    }
    mentions_upsert = sorted(
        (m for edge, m in final_mentions.items()
         if old.mentions.get(edge) != (set(m.names), set(m.descriptions))),
        key=lambda m: (m.chunk_id, m.ref),
    )
    mentions_delete = sorted(edge for edge in old.mentions if edge not in final_mentions)

    mine_by_ref: dict[Ref, list[Mention]] = defaultdict(list)
    for mention in final_mentions.values():
        mine_by_ref[mention.ref].append(mention)

    entities_upsert: list[tuple[Ref, StoredEntity]] = []
    entities_delete: list[Ref] = []
    created_entities = 0
    for ref in touched_refs(footprint, graph):
        records = others_mentions.get(ref, []) + mine_by_ref.get(ref, [])
        if not records:
            if ref in state.entities:
                entities_delete.append(ref)
            continue
        if not state.mentions.get(ref):
            created_entities += 1
        names: Counter[str] = Counter()
        descriptions: set[str] = set()
        for record in records:
            names.update(record.names)
            descriptions.update(record.descriptions)
        entity = StoredEntity(name=choose_name(names), description=merge_descriptions(descriptions))
        if state.entities.get(ref) != entity:
            entities_upsert.append((ref, entity))

    relationships_upsert: list[tuple[RelKey, StoredRelationship]] = []
    relationships_delete: list[RelKey] = []
    for key in touched_rel_keys(footprint, graph):
        sources = others_sources.get(key, set()) | final.sources.get(key, set())
        if not sources:
            if key in state.relationships:
                relationships_delete.append(key)
            continue
        rel = StoredRelationship(
            description=merge_descriptions(d for _, d in sources),
            chunk_ids=tuple(sorted({cid for cid, _ in sources}, key=text_order)),
            sources=tuple(sorted(sources, key=lambda s: (text_order(s[0]), text_order(s[1])))),
        )
        if state.relationships.get(key) != rel:
            relationships_upsert.append((key, rel))

    summary = WriteSummary(
        kb_id=kb_id,
        doc_id=doc_id,
        mode=mode,
        chunks=len(final.chunks),
        entities=len(mine_by_ref),
        relationships=sum(1 for s in final.sources.values() if s),
        mentions=len(final_mentions),
        chunks_removed=len(chunks_delete),
        mentions_removed=len(mentions_delete),
        entities_created=created_entities,
        entities_deleted=len(entities_delete),
        relationships_created=sum(1 for key, _ in relationships_upsert if key not in state.relationships),
        relationships_deleted=len(relationships_delete),
    )
    return WritePlan(
        chunks_upsert=chunks_upsert,
        chunks_delete=chunks_delete,
        mentions_upsert=mentions_upsert,
        mentions_delete=mentions_delete,
        entities_upsert=entities_upsert,
        entities_delete=entities_delete,
        relationships_upsert=relationships_upsert,
        relationships_delete=relationships_delete,
        delete_document=graph is None,
        summary=summary,
    )
