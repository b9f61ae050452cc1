"""What changed between two schema versions of a KB, and the cheapest correct way to follow it.

`diff_schemas(chain)` compares the first and the last of consecutive schema versions (renames compose
across the versions between) and says, per kind of type, what was added, removed, renamed and
changed, whether the prompt changed, and the strategy that brings a document extracted at the first
version to the last one (PRODUCT.md section 7):

- `none`: nothing that affects extraction changed;
- `graph-only`: only removals, renames and narrowed relationship endpoints: the document's previous
  extraction, migrated (`migrate_extraction`), is what a new extraction would give; no LLM call;
- `delta`: additions (with or without the above): the LLM is asked only for the added entity types
  and the added relationship types (`DeltaRequest`), and the answer is merged into the migrated
  previous extraction (`merge_delta`);
- `full`: a changed description, widened relationship endpoints or a new prompt version: every
  chunk is extracted again.

The strategy assumes what a well-behaved model does: types are extracted independently of each other,
so removing a type removes exactly its items and adding one adds exactly its items. All functions
here are pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from lumikb_pipeline.core.errors import UsageError
from lumikb_pipeline.domain.results import ChunkExtraction, ExtractedEntity, ExtractedRelationship
from lumikb_pipeline.domain.schema import DomainSchema, EntityType, RelationshipType

Strategy = Literal["none", "graph-only", "delta", "full"]
STRATEGIES: tuple[Strategy, ...] = ("none", "graph-only", "delta", "full")
_TypeT = TypeVar("_TypeT", EntityType, RelationshipType)


@dataclass(frozen=True)
class TypeChanges:
    """The changes of one kind of type (entity or relationship) between two versions."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    renamed: dict[str, str] = field(default_factory=dict)  # old name -> new name
    changed: tuple[str, ...] = ()  # new names

    def to_json(self) -> dict[str, Any]:
        return {"added": list(self.added), "removed": list(self.removed), "renamed": dict(self.renamed),
                "changed": list(self.changed)}


@dataclass(frozen=True)
class SchemaDiff:
    """The difference between schema versions `from_version` and `to_version` of one KB."""

    from_version: int
    to_version: int
    entity_types: TypeChanges
    relationship_types: TypeChanges
    prompt_changed: bool
    narrowed: tuple[str, ...] = ()  # relationship types whose endpoints only lost types (graph-only)
    full_reasons: tuple[str, ...] = ()  # why the strategy is `full`, in words
    target: DomainSchema | None = None

    @property
    def strategy(self) -> Strategy:
        if self.full_reasons:
            return "full"
        if self.entity_types.added or self.relationship_types.added:
            return "delta"
        if (self.entity_types.removed or self.entity_types.renamed or self.relationship_types.removed
                or self.relationship_types.renamed or self.narrowed):
            return "graph-only"
        return "none"

    def entity_name(self, old: str) -> str | None:
        """The name at `to_version` of entity type `old` of `from_version` (None: removed)."""
        if old in self.entity_types.removed:
            return None
        return self.entity_types.renamed.get(old, old)

    def relationship_name(self, old: str) -> str | None:
        """The name at `to_version` of relationship type `old` of `from_version` (None: removed)."""
        if old in self.relationship_types.removed:
            return None
        return self.relationship_types.renamed.get(old, old)

    def to_json(self, kb: str) -> dict[str, Any]:
        """The JSON of `lumikb schema diff --json` (PRODUCT.md section 7)."""
        return {
            "kb": kb, "from": self.from_version, "to": self.to_version,
            "entity_types": self.entity_types.to_json(),
            "relationship_types": self.relationship_types.to_json(),
            "prompt_changed": self.prompt_changed,
            "strategy": self.strategy,
        }


def check_renames(current: DomainSchema, new: DomainSchema) -> DomainSchema:
    """`new` (about to become the version after `current`) with its `renamed_from` checked.

    A `renamed_from` must name a type of `current` that `new` no longer has; one that is already
    done (the type has its new name in `current` too: the file was kept from the last change) is
    dropped. Raises a UsageError naming the type and the known names otherwise.
    """
    entity_names = {t.name for t in current.entity_types}
    relationship_names = {t.name for t in current.relationship_types}
    entity_types = tuple(_checked(t, entity_names, "entity type") for t in new.entity_types)
    relationship_types = tuple(_checked(t, relationship_names, "relationship type") for t in new.relationship_types)
    return new.model_copy(update={"entity_types": entity_types, "relationship_types": relationship_types})


def _checked(item: _TypeT, current_names: set[str], kind: str) -> _TypeT:
    if item.renamed_from is None:
        return item
    if item.name in current_names:
        return item.model_copy(update={"renamed_from": None})
    if item.renamed_from not in current_names:
        raise UsageError(
            f"{kind} {item.name!r} says renamed_from {item.renamed_from!r}, but the current schema version has "
            f"no {kind} of that name (it has: {', '.join(sorted(current_names)) or 'none'}); fix the old name "
            "or remove renamed_from to add the type as new"
        )
    return item


def diff_schemas(chain: Sequence[DomainSchema], from_version: int, to_version: int) -> SchemaDiff:
    """The diff from `chain[0]` (version `from_version`) to `chain[-1]` (`to_version`).

    `chain` holds every version in between, in order, so renames compose (A renamed to B in one
    version and B to C in the next is A renamed to C). A type removed and later added again under
    the same name counts as kept (changed if its definition differs).
    """
    if not chain:
        raise ValueError("diff_schemas needs at least one schema version")
    first, last = chain[0], chain[-1]
    entity_map = _compose({t.name: t.name for t in first.entity_types}, chain, "entity_types")
    rel_map = _compose({t.name: t.name for t in first.relationship_types}, chain, "relationship_types")

    entity_changes, entity_changed = _changes(entity_map, [t.name for t in last.entity_types])
    rel_changes, rel_kept = _changes(rel_map, [t.name for t in last.relationship_types])
    entity_map = {**entity_map, **dict(entity_changed)}  # with the types removed and added again
    first_entities = {t.name: t for t in first.entity_types}
    last_entities = {t.name: t for t in last.entity_types}
    first_rels = {t.name: t for t in first.relationship_types}
    last_rels = {t.name: t for t in last.relationship_types}

    reasons: list[str] = []
    changed_entities: list[str] = []
    for old, new in entity_changed:
        if first_entities[old].description != last_entities[new].description:
            changed_entities.append(new)
            reasons.append(f"the description of entity type {new} changed")
    changed_rels: list[str] = []
    narrowed: list[str] = []
    for old, new in rel_kept:
        before, after = first_rels[old], last_rels[new]
        widened = narrowed_here = False
        for end in ("source", "target"):
            old_ends = {entity_map.get(e) for e in getattr(before, end)} - {None}
            new_ends = set(getattr(after, end))
            widened = widened or not new_ends <= old_ends
            # Fewer endpoint types, or one of them removed: relationships may go, none can come.
            narrowed_here = narrowed_here or new_ends != old_ends or len(old_ends) < len(getattr(before, end))
        if before.description != after.description:
            changed_rels.append(new)
            reasons.append(f"the description of relationship type {new} changed")
        elif widened:
            changed_rels.append(new)
            reasons.append(f"relationship type {new} allows new endpoint types")
        elif narrowed_here:
            changed_rels.append(new)
            narrowed.append(new)
    prompt_changed = first.prompt_version != last.prompt_version
    if prompt_changed:
        reasons.append(f"the prompt version changed ({first.prompt_version} -> {last.prompt_version})")
    return SchemaDiff(
        from_version=from_version,
        to_version=to_version,
        entity_types=TypeChanges(
            added=entity_changes.added, removed=entity_changes.removed, renamed=entity_changes.renamed,
            changed=tuple(changed_entities),
        ),
        relationship_types=TypeChanges(
            added=rel_changes.added, removed=rel_changes.removed, renamed=rel_changes.renamed,
            changed=tuple(changed_rels),
        ),
        prompt_changed=prompt_changed,
        narrowed=tuple(narrowed),
        full_reasons=tuple(reasons),
        target=last,
    )


def _compose(mapping: dict[str, str | None], chain: Sequence[DomainSchema], kind: str) -> dict[str, str | None]:
    """Follow each type of the first version through the chain: its name in the last, or None."""
    current: dict[str, str | None] = dict(mapping)
    for schema in chain[1:]:
        types: tuple[EntityType | RelationshipType, ...] = getattr(schema, kind)
        names = {t.name for t in types}
        renamed_to = {t.renamed_from: t.name for t in types if t.renamed_from}
        for original, name in current.items():
            if name is None:
                continue
            if name in renamed_to and name not in names:
                current[original] = renamed_to[name]
            elif name not in names:
                current[original] = None
    return current


def _changes(mapping: dict[str, str | None], last_names: list[str]) -> tuple[TypeChanges, list[tuple[str, str]]]:
    """Added, removed and renamed names, and the (old, new) pairs of types that continue."""
    image = {new for new in mapping.values() if new is not None}
    removed = [old for old, new in mapping.items() if new is None]
    # Removed and added again under the same name: the same type, kept.
    readded = {old for old in removed if old in last_names and old not in image}
    kept = [(old, new) for old, new in mapping.items() if new is not None]
    kept += [(old, old) for old in sorted(readded)]
    return (
        TypeChanges(
            added=tuple(n for n in last_names if n not in image and n not in readded),
            removed=tuple(sorted(old for old in removed if old not in readded)),
            renamed={old: new for old, new in sorted(mapping.items()) if new is not None and new != old},
        ),
        kept,
    )


# --- applying a diff to one chunk's extraction --------------------------------------------------


def migrate_extraction(extraction: ChunkExtraction, diff: SchemaDiff) -> ChunkExtraction:
    """A chunk's extraction at `diff.from_version` moved to `diff.to_version` without an LLM call:
    items of removed types go, renamed types take their new names, and relationships whose
    endpoint types the target no longer allows go. Usage figures are zero (nothing was paid)."""
    target = diff.target
    if target is None:
        raise ValueError("the diff has no target schema")
    entities: dict[tuple[str, str], ExtractedEntity] = {}
    for entity in extraction.entities:
        new_type = diff.entity_name(entity.type)
        if new_type is not None and new_type in target.entity_type_names:
            moved = entity.model_copy(update={"type": new_type})
            entities.setdefault((new_type, entity.name.casefold()), moved)
    relationships: list[ExtractedRelationship] = []
    for rel in extraction.relationships:
        rel_type = diff.relationship_name(rel.type)
        source_type, target_type = diff.entity_name(rel.source_type), diff.entity_name(rel.target_type)
        if rel_type is None or source_type is None or target_type is None:
            continue
        if not target.allows_relationship(rel_type, source_type, target_type):
            continue
        relationships.append(rel.model_copy(update={
            "type": rel_type, "source_type": source_type, "target_type": target_type,
        }))
    return ChunkExtraction(
        chunk_id=extraction.chunk_id, entities=list(entities.values()), relationships=relationships,
    )


@dataclass(frozen=True)
class DeltaRequest:
    """What a `delta` extraction asks the LLM for: the added entity types and the added relationship
    types (`ask`, a schema whose relationship types may name entity types of `target` that `ask`
    does not list: those endpoints are the chunk's known entities)."""

    ask: DomainSchema
    target: DomainSchema

    @property
    def validation_schema(self) -> DomainSchema:
        """The schema an answer is validated against: the asked types plus every target entity type
        (relationship endpoints may be known entities of any type)."""
        asked = self.ask.entity_type_names
        return self.ask.model_copy(update={
            "entity_types": (*self.ask.entity_types, *(t for t in self.target.entity_types if t.name not in asked)),
        })


def delta_request(diff: SchemaDiff) -> DeltaRequest:
    """The delta of a diff whose strategy is `delta`."""
    target = diff.target
    if target is None or diff.strategy != "delta":
        raise ValueError(f"a delta request needs a diff whose strategy is delta, not {diff.strategy}")
    added_entities = set(diff.entity_types.added)
    added_rels = set(diff.relationship_types.added)
    ask = DomainSchema(
        entity_types=tuple(t for t in target.entity_types if t.name in added_entities),
        relationship_types=tuple(t for t in target.relationship_types if t.name in added_rels),
        prompt_version=target.prompt_version,
    )
    return DeltaRequest(ask=ask, target=target)


def merge_delta(base: ChunkExtraction, answer: ChunkExtraction, request: DeltaRequest) -> ChunkExtraction:
    """The migrated previous extraction `base` plus a delta `answer`: the answer's entities of asked
    types and its relationships of asked types (whose endpoints are kept as entities); anything else
    the model volunteered is ignored. Usage figures are the answer's (what the delta cost)."""
    asked_entities = request.ask.entity_type_names
    asked_rels = {t.name for t in request.ask.relationship_types}
    entities = {(e.type, e.name.casefold()): e for e in base.entities}
    for entity in answer.entities:
        if entity.type in asked_entities:
            entities.setdefault((entity.type, entity.name.casefold()), entity)
    relationships = list(base.relationships)
    seen = {(r.type, r.source_type, r.source.casefold(), r.target_type, r.target.casefold()) for r in relationships}
    for rel in answer.relationships:
        key = (rel.type, rel.source_type, rel.source.casefold(), rel.target_type, rel.target.casefold())
        if rel.type not in asked_rels or key in seen:
            continue
        if not request.target.allows_relationship(rel.type, rel.source_type, rel.target_type):
            continue
        seen.add(key)
        relationships.append(rel)
        for name, type_name in ((rel.source, rel.source_type), (rel.target, rel.target_type)):
            entities.setdefault((type_name, name.casefold()), ExtractedEntity(name=name, type=type_name))
    return ChunkExtraction(
        chunk_id=answer.chunk_id or base.chunk_id, entities=list(entities.values()), relationships=relationships,
        dropped=answer.dropped, llm_calls=answer.llm_calls, prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens, cost_usd=answer.cost_usd,
    )
