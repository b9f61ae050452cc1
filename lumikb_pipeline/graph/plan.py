"""What a write must change, computed from what is stored: the write semantics, in Python, for both stores.

Each store writes a document in three steps inside one transaction:
1. lock the document and read its *footprint*: its chunks, its MENTIONS records and its relationship
   provenance records (reached from its own chunks, so the cost is the document's size);
2. lock the touched entities, in one global order, and read the *aggregates* of the touched entities
   and relationships (`StoredState`): a bounded summary of every document's records;
3. apply the `WritePlan` that `plan_write` derives from the footprint, the aggregates and the new graph.

Provenance records are the unit everything derives from. An entity's records are its MENTIONS edges,
each carrying the names and descriptions the mentioning chunk's document gave the entity; a
relationship's records are (chunk id, description) pairs, stored one per record (never as a list on
the relationship). An entity's `name` and `description` and a relationship's `description` follow the
rules of `graph.merging` over the full set of records, so they never depend on the order of writes,
and an element whose last record disappears is deleted.

Hub entities (a company named in every document) have records from thousands of documents, so a write
never reads all of them: it applies the *difference* between the document's old and new records to
the aggregate (`Tally`): counts per name, and the counts of the smallest descriptions, 1.5 times as
many characters as the merged description can show (`MAX_MERGED_DESCRIPTION`). Only when removals
leave the kept head shorter than what the merged text shows, while other descriptions exist beyond
it, does the plan read every record of that element (`RecordLoader`): after a recount that takes
removals of half `MAX_MERGED_DESCRIPTION` characters of kept descriptions, so it is rare and
amortised.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph, GraphRelationship
from lumikb_pipeline.graph.merging import (
    DESCRIPTION_SEPARATOR,
    MAX_MERGED_DESCRIPTION,
    choose_name,
    provenance_text,
    text_order,
)
from lumikb_pipeline.graph.store import WriteSummary

# Plain tuples rather than `EntityRef` models: they are hashed and sorted thousands of times per
# write, and their natural order is the lock order.
Ref = tuple[str, str]
"""An entity's identity within a KB: (type, key)."""

RelKey = tuple[str, str, str, str, str]
"""A relationship's identity within a KB: (type, source type, source key, target type, target key)."""

Source = tuple[str, str]
"""One provenance record of a relationship: (chunk id, description given by that chunk's document)."""

MentionValue = tuple[frozenset[str], frozenset[str]]
"""What one MENTIONS record says: (names, non-blank descriptions)."""


HEAD_SLACK = 1.5  # a capped tally keeps the texts of 1.5 times the characters the merged text shows


def rel_key(rel: GraphRelationship) -> RelKey:
    return (rel.type, rel.source.type, rel.source.key, rel.target.type, rel.target.key)


def _sorted_texts(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(texts, key=text_order))


# --- aggregates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """Counted texts (how many records give each), kept sorted in `text_order`.

    With a `cap`, only the *head* is kept: the smallest texts whose join (by `DESCRIPTION_SEPARATOR`)
    covers `HEAD_SLACK * cap` characters (a merged description cut at `cap` shows less). Every text
    smaller than the head's last is in the head. `complete` says that no other text has a record
    (always true without a cap).
    """

    texts: tuple[str, ...] = ()
    counts: tuple[int, ...] = ()
    complete: bool = True

    @classmethod
    def of(cls, counter: Counter[str], cap: int | None) -> Tally:
        """The tally of a full count of records."""
        texts = _sorted_texts(t for t, n in counter.items() if n > 0)
        return _trimmed(texts, [counter[t] for t in texts], True, cap)

    def updated(self, delta: Counter[str], cap: int | None) -> Tally | None:
        """The tally after adding (positive) and removing (negative) records; None when the kept head
        no longer covers `cap` characters while texts beyond it exist, so that it must be recounted
        from every record."""
        # Texts stay sorted: counts change in place and new texts are inserted by bisection, so a
        # write costs a few comparisons, not a sort of the head.
        texts, counts = list(self.texts), list(self.counts)
        position = {text: i for i, text in enumerate(texts)}
        last = text_order(texts[-1]) if texts else b""
        added: list[tuple[str, int]] = []
        for text, change in delta.items():
            if change == 0:
                continue
            if text in position:
                counts[position[text]] += change
            elif change > 0:
                if self.complete or text_order(text) < last:
                    added.append((text, change))
                # else: beyond the head, which already covers `cap`; the record alone remembers it
            elif self.complete:
                return None  # a record the tally never counted: recount rather than guess
        if added or any(n <= 0 for n in counts):
            kept = [(t, n) for t, n in zip(texts, counts, strict=True) if n > 0]
            for item in added:
                bisect.insort(kept, item, key=lambda pair: text_order(pair[0]))
            texts, counts = [t for t, _ in kept], [n for _, n in kept]
        tally = _trimmed(tuple(texts), counts, self.complete, cap)
        if cap is not None and not tally.complete and _joined_length(tally.texts) < cap:
            return None
        return tally

    def joined(self) -> str:
        """The merged description (`merging.merge_descriptions` of every record's text)."""
        return DESCRIPTION_SEPARATOR.join(self.texts)[:MAX_MERGED_DESCRIPTION]

    def top(self) -> str:
        """The displayed name (`merging.choose_name` of every record's names)."""
        return choose_name(Counter(dict(zip(self.texts, self.counts, strict=True))))

    def to_json(self) -> list[object]:
        return [list(self.texts), list(self.counts), self.complete]

    @classmethod
    def from_json(cls, value: list[Any]) -> Tally:
        texts, counts, complete = value
        return cls(texts=tuple(texts), counts=tuple(counts), complete=bool(complete))


def _joined_length(texts: tuple[str, ...]) -> int:
    return sum(len(t) for t in texts) + len(DESCRIPTION_SEPARATOR) * max(0, len(texts) - 1)


def _trimmed(texts: tuple[str, ...], counts: list[int], complete: bool, cap: int | None) -> Tally:
    """Keep the smallest texts whose join covers `HEAD_SLACK` times `cap` characters: more than the
    merged text shows, so that removals rarely shrink the head below `cap` (which costs a recount)."""
    keep = len(texts)
    if cap is not None:
        length = 0  # of the join of the texts kept so far
        for i, text in enumerate(texts):
            if i and length >= HEAD_SLACK * cap:
                keep = i
                break
            length += len(text) + (len(DESCRIPTION_SEPARATOR) if i else 0)
    return Tally(texts=texts[:keep], counts=tuple(counts[:keep]), complete=complete and keep == len(texts))


@dataclass(frozen=True)
class EntityState:
    """An entity as stored: its displayed fields and the aggregate of its MENTIONS records."""

    name: str
    description: str
    mentions: int  # MENTIONS records
    names: Tally
    descriptions: Tally

    def aggregate_json(self) -> str:
        return json.dumps([self.mentions, self.names.to_json(), self.descriptions.to_json()], ensure_ascii=False)

    @classmethod
    def from_stored(cls, name: str, description: str, aggregate: str) -> EntityState:
        mentions, names, descriptions = json.loads(aggregate)
        return cls(name, description, mentions, Tally.from_json(names), Tally.from_json(descriptions))


@dataclass(frozen=True)
class RelationshipState:
    """A relationship as stored: its description and the aggregate of its provenance records."""

    description: str
    sources: int  # (chunk id, description) records
    descriptions: Tally

    def aggregate_json(self) -> str:
        return json.dumps([self.sources, self.descriptions.to_json()], ensure_ascii=False)

    @classmethod
    def from_stored(cls, description: str, aggregate: str) -> RelationshipState:
        sources, descriptions = json.loads(aggregate)
        return cls(description, sources, Tally.from_json(descriptions))


def entity_state(records: Iterable[MentionValue]) -> EntityState | None:
    """An entity's state computed from all its MENTIONS records (None without records)."""
    records = list(records)
    if len(records) == 1 and len(records[0][0]) == 1 and len(records[0][1]) <= 1:  # the common case
        (only_name,), only_description = records[0]
        text = tuple(only_description)
        return EntityState(only_name, text[0][:MAX_MERGED_DESCRIPTION] if text else "", 1, Tally((only_name,), (1,)),
                           Tally(text, (1,) * len(text)))
    names: Counter[str] = Counter()
    descriptions: Counter[str] = Counter()
    count = 0
    for record_names, record_descriptions in records:
        count += 1
        names.update(record_names)
        descriptions.update(record_descriptions)
    if not count:
        return None
    names_tally = Tally.of(names, None)
    descriptions_tally = Tally.of(descriptions, MAX_MERGED_DESCRIPTION)
    return EntityState(names_tally.top(), descriptions_tally.joined(), count, names_tally, descriptions_tally)


def relationship_state(sources: Iterable[Source]) -> RelationshipState | None:
    """A relationship's state computed from all its provenance records (None without records)."""
    unique = set(sources)
    if len(unique) == 1:  # the common case
        ((_, text),) = unique
        texts = (text,) if text else ()
        return RelationshipState(text[:MAX_MERGED_DESCRIPTION], 1, Tally(texts, (1,) * len(texts)))
    if not unique:
        return None
    tally = Tally.of(Counter(d for _, d in unique if d), MAX_MERGED_DESCRIPTION)
    return RelationshipState(tally.joined(), len(unique), tally)


# --- what a write reads --------------------------------------------------------------------------


@dataclass
class Footprint:
    """What one document contributes now: read under the document's lock, before entity locks."""

    exists: bool = False
    chunks: dict[str, int] = field(default_factory=dict)  # chunk id -> ordinal
    mentions: dict[tuple[str, Ref], MentionValue] = field(default_factory=dict)
    sources: dict[RelKey, set[Source]] = field(default_factory=lambda: defaultdict(set))

    @property
    def refs(self) -> set[Ref]:
        return {ref for _, ref in self.mentions}

    @property
    def rel_keys(self) -> set[RelKey]:
        return {key for key, sources in self.sources.items() if sources}


@dataclass
class StoredState:
    """The aggregates of the touched entities and relationships, read while their entities are locked.
    An element missing here does not exist (yet)."""

    entities: dict[Ref, EntityState] = field(default_factory=dict)
    relationships: dict[RelKey, RelationshipState] = field(default_factory=dict)


class RecordLoader(Protocol):
    """Every stored record of one element (read under the same locks), for the rare recount."""

    def entity_records(self, ref: Ref) -> list[tuple[str, MentionValue]]:
        """(chunk id, (names, descriptions)) of every MENTIONS edge of the entity."""
        ...

    def relationship_records(self, key: RelKey) -> list[Source]:
        """Every (chunk id, description) record of the relationship."""
        ...


@dataclass(frozen=True)
class Mention:
    """One MENTIONS edge: chunk -> entity, with what the chunk's document said about the entity."""

    chunk_id: str
    ref: Ref
    names: tuple[str, ...]
    descriptions: tuple[str, ...]


@dataclass
class WritePlan:
    """The changes to apply, each list sorted (a stable lock order)."""

    chunks_upsert: list[tuple[str, int]]
    chunks_delete: list[str]
    mentions_upsert: list[Mention]
    mentions_delete: list[tuple[str, Ref]]
    sources_add: list[tuple[RelKey, Source]]
    sources_delete: list[tuple[RelKey, Source]]
    entities_upsert: list[tuple[Ref, EntityState]]
    entities_delete: list[Ref]
    relationships_upsert: list[tuple[RelKey, RelationshipState]]
    relationships_delete: list[RelKey]
    delete_document: bool
    summary: WriteSummary
    recounts: int = 0  # elements whose aggregate had to be recounted from all their records
    created_relationships: set[RelKey] = field(default_factory=set)  # among relationships_upsert


def touched_refs(footprint: Footprint, graph: DocumentGraph | None) -> list[Ref]:
    """Entities the write may change, sorted (a stable order for plans and locks). Relationship
    endpoints are among them: a relationship's endpoints are entities of the same contribution."""
    refs = footprint.refs
    if graph is not None:
        refs.update((e.type, e.key) for e in graph.entities)
    return sorted(refs)


def touched_rel_keys(footprint: Footprint, graph: DocumentGraph | None) -> list[RelKey]:
    """Relationships the write may change, sorted."""
    keys = footprint.rel_keys
    if graph is not None:
        keys.update(rel_key(r) for r in graph.relationships)
    return sorted(keys)


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class _Contribution:
    chunks: dict[str, int] = field(default_factory=dict)
    mentions: dict[tuple[str, Ref], MentionValue] = field(default_factory=dict)
    sources: dict[RelKey, set[Source]] = field(default_factory=lambda: defaultdict(set))


def _new_contribution(graph: DocumentGraph | None) -> _Contribution:
    contribution = _Contribution()
    if graph is None:
        return contribution
    contribution.chunks = {c.id: c.ordinal for c in graph.chunks}
    for entity in graph.entities:
        ref = (entity.type, entity.key)
        descriptions = frozenset({entity.description} if entity.description.strip() else ())
        for chunk_id in entity.chunk_ids:
            contribution.mentions[(chunk_id, ref)] = (frozenset({entity.name}), descriptions)
    for rel in graph.relationships:
        description = provenance_text(rel.description)
        contribution.sources[rel_key(rel)].update((chunk_id, description) for chunk_id in rel.chunk_ids)
    return contribution


def _mention_delta(old: MentionValue | None, new: MentionValue | None) -> tuple[int, Counter[str], Counter[str]]:
    names: Counter[str] = Counter()
    descriptions: Counter[str] = Counter()
    if old is not None:
        names.subtract(old[0])
        descriptions.subtract(old[1])
    if new is not None:
        names.update(new[0])
        descriptions.update(new[1])
    return (new is not None) - (old is not None), names, descriptions


def plan_write(
    kb_id: str,
    doc_id: str,
    graph: DocumentGraph | None,
    mode: WriteMode,
    footprint: Footprint,
    state: StoredState,
    loader: RecordLoader,
) -> WritePlan:
    """The changes that make the document's contribution `graph` (replace) or its current
    contribution plus `graph` (merge). `graph=None` with mode "replace" removes the document."""
    doc_chunks = set(footprint.chunks) | ({c.id for c in graph.chunks} if graph else set())
    old = _Contribution(chunks=dict(footprint.chunks), mentions=dict(footprint.mentions))
    for key, sources in footprint.sources.items():
        old.sources[key] = set(sources)

    new = _new_contribution(graph)
    if mode == WriteMode.REPLACE:
        final = new
    else:
        final = _Contribution(chunks={**old.chunks, **new.chunks})
        for edge in old.mentions.keys() | new.mentions.keys():
            old_names, old_descriptions = old.mentions.get(edge, (frozenset(), frozenset()))
            new_names, new_descriptions = new.mentions.get(edge, (frozenset(), frozenset()))
            final.mentions[edge] = (old_names | new_names, old_descriptions | new_descriptions)
        for key in old.sources.keys() | new.sources.keys():
            final.sources[key] = old.sources.get(key, set()) | new.sources.get(key, set())

    chunks_delete = sorted(set(old.chunks) - set(final.chunks))
    chunks_upsert = sorted(
        (cid, ordinal) for cid, ordinal in final.chunks.items() if old.chunks.get(cid) != ordinal
    )
    mentions_upsert = sorted(
        (Mention(chunk_id=edge[0], ref=edge[1], names=_sorted_texts(value[0]), descriptions=_sorted_texts(value[1]))
         for edge, value in final.mentions.items() if old.mentions.get(edge) != value),
        key=lambda m: (m.chunk_id, m.ref),
    )
    mentions_delete = sorted(edge for edge in old.mentions if edge not in final.mentions)

    edges_by_ref: dict[Ref, set[str]] = defaultdict(set)
    for chunk_id, ref in old.mentions.keys() | final.mentions.keys():
        edges_by_ref[ref].add(chunk_id)
    recounts = 0

    entities_upsert: list[tuple[Ref, EntityState]] = []
    entities_delete: list[Ref] = []
    created_entities = 0
    for ref in touched_refs(footprint, graph):
        stored = state.entities.get(ref)
        edges = edges_by_ref.get(ref, ())
        if stored is None:  # new: its records are this document's (the common case, made cheap)
            new_entity = entity_state(final.mentions[(cid, ref)] for cid in edges if (cid, ref) in final.mentions)
            if new_entity is not None:
                created_entities += 1
                entities_upsert.append((ref, new_entity))
            continue
        if all(old.mentions.get((cid, ref)) == final.mentions.get((cid, ref)) for cid in edges):
            continue  # this document's records of it are unchanged
        count = stored.mentions
        names_delta: Counter[str] = Counter()
        descriptions_delta: Counter[str] = Counter()
        for chunk_id in edges:
            edge = (chunk_id, ref)
            change, names, descriptions = _mention_delta(old.mentions.get(edge), final.mentions.get(edge))
            count += change
            names_delta.update(names)
            descriptions_delta.update(descriptions)
        entity: EntityState | None = None
        if count > 0:
            names_tally = stored.names.updated(names_delta, None)
            descriptions_tally = stored.descriptions.updated(descriptions_delta, MAX_MERGED_DESCRIPTION)
            if names_tally is None or descriptions_tally is None:
                recounts += 1
                records = [value for cid, value in loader.entity_records(ref) if cid not in doc_chunks]
                records += [value for (cid, r), value in final.mentions.items() if r == ref]
                entity = entity_state(records)
            else:
                entity = EntityState(names_tally.top(), descriptions_tally.joined(), count, names_tally,
                                     descriptions_tally)
        if entity is None:
            entities_delete.append(ref)
        elif stored != entity:
            entities_upsert.append((ref, entity))

    sources_add: list[tuple[RelKey, Source]] = []
    sources_delete: list[tuple[RelKey, Source]] = []
    relationships_upsert: list[tuple[RelKey, RelationshipState]] = []
    relationships_delete: list[RelKey] = []
    created_relationships: set[RelKey] = set()
    for key in touched_rel_keys(footprint, graph):
        stored_rel = state.relationships.get(key)
        mine, was_mine = final.sources.get(key, set()), old.sources.get(key, set())
        if mine == was_mine:
            continue  # this document's records of it are unchanged
        added, removed = mine - was_mine, was_mine - mine
        sources_add += [(key, s) for s in sorted(added)]
        sources_delete += [(key, s) for s in sorted(removed)]
        if stored_rel is None:  # new: its records are this document's
            new_rel = relationship_state(mine)
            if new_rel is not None:
                created_relationships.add(key)
                relationships_upsert.append((key, new_rel))
            continue
        count = (stored_rel.sources if stored_rel else 0) + len(added) - len(removed)
        rel: RelationshipState | None = None
        if count > 0:
            delta: Counter[str] = Counter(d for _, d in added if d)
            delta.subtract(d for _, d in removed if d)
            tally = (stored_rel.descriptions if stored_rel else Tally()).updated(delta, MAX_MERGED_DESCRIPTION)
            if tally is None:
                recounts += 1
                kept = [s for s in loader.relationship_records(key) if s[0] not in doc_chunks]
                rel = relationship_state(kept + list(final.sources.get(key, ())))
            else:
                rel = RelationshipState(tally.joined(), count, tally)
        if rel is None:
            if stored_rel is not None:
                relationships_delete.append(key)
            continue
        if stored_rel is None:
            created_relationships.add(key)
        if stored_rel != rel:
            relationships_upsert.append((key, rel))

    summary = WriteSummary(
        kb_id=kb_id,
        doc_id=doc_id,
        mode=mode,
        chunks=len(final.chunks),
        entities=len({ref for _, ref in final.mentions}),
        relationships=sum(1 for s in final.sources.values() if s),
        mentions=len(final.mentions),
        chunks_removed=len(chunks_delete),
        mentions_removed=len(mentions_delete),
        entities_created=created_entities,
        entities_deleted=len(entities_delete),
        relationships_created=len(created_relationships),
        relationships_deleted=len(relationships_delete),
    )
    return WritePlan(
        chunks_upsert=chunks_upsert,
        chunks_delete=chunks_delete,
        mentions_upsert=mentions_upsert,
        mentions_delete=mentions_delete,
        sources_add=sources_add,
        sources_delete=sources_delete,
        entities_upsert=entities_upsert,
        entities_delete=entities_delete,
        relationships_upsert=relationships_upsert,
        relationships_delete=relationships_delete,
        delete_document=graph is None,
        summary=summary,
        recounts=recounts,
        created_relationships=created_relationships,
    )
