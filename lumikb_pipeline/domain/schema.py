"""The domain schema of a knowledge base: entity types, relationship types, prompt version.

`parse_schema_file` reads a schema file (YAML or JSON; JSON is YAML) and refuses one that breaks the
rules of PRODUCT.md section 1 with a message that points at the line.
"""

from __future__ import annotations

import gc
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lumikb_pipeline.core.errors import SchemaFileError

ENTITY_TYPE_PATTERN = re.compile(r"^[A-Z][A-Za-z0-9_]{0,63}$")
RELATIONSHIP_TYPE_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
KB_SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# The graph model's own relationships (docs/graph-model.md): a schema type with one of these names
# would be confused with a document's chunks and their mentions.
RESERVED_RELATIONSHIP_TYPES = frozenset({"HAS_CHUNK", "MENTIONS"})


class EntityType(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    renamed_from: str | None = None  # the name this type had in the version before (schema evolution)


class RelationshipType(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    source: tuple[str, ...]
    target: tuple[str, ...]
    description: str = ""
    renamed_from: str | None = None


class DomainSchema(BaseModel):
    """One version's content. Equal content means equal schema (used to skip no-op `schema set`)."""

    model_config = ConfigDict(frozen=True)

    entity_types: tuple[EntityType, ...]
    relationship_types: tuple[RelationshipType, ...] = ()
    prompt_version: int = Field(default=1, ge=1)

    @property
    def entity_type_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.entity_types)

    def relationship_type(self, name: str) -> RelationshipType | None:
        return next((r for r in self.relationship_types if r.name == name), None)

    def allows_relationship(self, name: str, source_type: str, target_type: str) -> bool:
        """True when `name` is a relationship type of this schema with these endpoint types."""
        rel = self.relationship_type(name)
        return rel is not None and source_type in rel.source and target_type in rel.target

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def without_renames(self) -> DomainSchema:
        """The same types without their `renamed_from` (which only relates a version to the one before)."""
        return self.model_copy(update={
            "entity_types": tuple(t.model_copy(update={"renamed_from": None}) for t in self.entity_types),
            "relationship_types": tuple(
                t.model_copy(update={"renamed_from": None}) for t in self.relationship_types
            ),
        })


def check_kb_slug(slug: str) -> str:
    """Return `slug` if it is a valid KB slug, else raise a UsageError that shows the rule."""
    from lumikb_pipeline.core.errors import UsageError

    if not KB_SLUG_PATTERN.match(slug):
        raise UsageError(
            f"KB slug {slug!r} is not valid: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit (e.g. 'legal-contracts')"
        )
    return slug


class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # libyaml when built in
    """A YAML loader that remembers the line of every mapping, so errors can point at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        key = str(loader.construct_object(key_node, deep=True))
        if key in seen:
            # YAML would keep the last value silently; a schema that says a thing twice is a mistake.
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    mapping = {str(key): value for key, value in loader.construct_mapping(node, deep=True).items()}
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _fail(where: str, line: int | None, message: str) -> SchemaFileError:
    at = f"{where}, line {line}" if line else where
    return SchemaFileError(f"{at}: {message}")


def _text(item: dict[str, Any], key: str, where: str, line: int | None, required: bool) -> str:
    value = item.get(key)
    if value is None:
        if required:
            raise _fail(where, line, f"'{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise _fail(where, line, f"'{key}' must be text, not {type(value).__name__}")
    return value


def _renamed_from(
    item: dict[str, Any], name: str, pattern: re.Pattern[str], claimed: dict[str, tuple[str, int | None]],
    where: str, line: int | None,
) -> str | None:
    """The optional `renamed_from` of a type: the form of a type name, not the type's own name, and
    not claimed by another type of the file (whether the old name existed is checked by `schema set`)."""
    if item.get("renamed_from") is None:
        return None
    old = _text(item, "renamed_from", where, line, required=True)
    if not pattern.match(old):
        raise _fail(where, line, f"renamed_from {old!r} of {name!r} must match {pattern.pattern}")
    if old == name:
        raise _fail(where, line, f"{name!r} has renamed_from {old!r}, its own name; remove renamed_from")
    if old in claimed:
        raise _fail(where, line, f"{name!r} and {claimed[old][0]!r} both say renamed_from {old!r}; a type can be "
                                 "renamed to one name only")
    claimed[old] = (name, line)
    return old


def _type_list(item: dict[str, Any], key: str, where: str, line: int | None) -> tuple[str, ...]:
    value = item.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(where, line, f"'{key}' must be a non-empty list of entity type names, e.g. [Person]")
    return tuple(value)


def parse_schema_text(text: str, where: str = "schema") -> DomainSchema:
    """Parse and validate a schema document; `where` names it in error messages."""
    if (bad := re.search(r"[\ud800-\udfff]", text)) is not None:
        at_line = text.count("\n", 0, bad.start()) + 1
        raise _fail(where, at_line, "holds a lone surrogate, not valid Unicode text; fix the text at its source")
    collecting = gc.isenabled()
    gc.disable()  # the loader makes a million small objects; collecting between them makes it quadratic
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        # The context mark is where the broken construct opened (e.g. an unclosed '['), the
        # problem mark where the parser gave up; the former is the line to fix.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise _fail(where, line, f"not valid YAML or JSON ({problem})") from None
    finally:
        if collecting:
            gc.enable()
    if not isinstance(data, dict):
        raise _fail(where, None, "must be a mapping with 'entity_types' and 'relationship_types'")
    top_line = data.pop("__line__", None)
    unknown = sorted(set(data) - {"entity_types", "relationship_types", "prompt_version"})
    if unknown:
        raise _fail(
            where, top_line, f"unknown key(s) {', '.join(unknown)}; "
            "allowed: entity_types, relationship_types, prompt_version"
        )

    raw_entities = data.get("entity_types")
    if not isinstance(raw_entities, list) or not raw_entities:
        raise _fail(where, top_line, "'entity_types' must be a non-empty list")
    entities: list[EntityType] = []
    entity_names: set[str] = set()
    entity_renames: dict[str, tuple[str, int | None]] = {}
    for raw in raw_entities:
        if not isinstance(raw, dict):
            raise _fail(where, top_line, "each entity type must be a mapping with 'name' and 'description'")
        line = raw.get("__line__")
        name = _text(raw, "name", where, line, required=True)
        if not ENTITY_TYPE_PATTERN.match(name):
            raise _fail(where, line, f"entity type name {name!r} must match {ENTITY_TYPE_PATTERN.pattern}")
        if name in entity_names:
            raise _fail(where, line, f"entity type {name!r} is defined twice")
        entity_names.add(name)
        entities.append(EntityType(
            name=name, description=_text(raw, "description", where, line, False),
            renamed_from=_renamed_from(raw, name, ENTITY_TYPE_PATTERN, entity_renames, where, line),
        ))

    raw_relationships = data.get("relationship_types") or []
    if not isinstance(raw_relationships, list):
        raise _fail(where, top_line, "'relationship_types' must be a list")
    relationships: list[RelationshipType] = []
    relationship_names: set[str] = set()
    relationship_renames: dict[str, tuple[str, int | None]] = {}
    for raw in raw_relationships:
        if not isinstance(raw, dict):
            raise _fail(where, top_line, "each relationship type must be a mapping with name, source, target")
        line = raw.get("__line__")
        name = _text(raw, "name", where, line, required=True)
        if not RELATIONSHIP_TYPE_PATTERN.match(name):
            raise _fail(
                where, line, f"relationship type name {name!r} must match {RELATIONSHIP_TYPE_PATTERN.pattern}"
            )
        if name in RESERVED_RELATIONSHIP_TYPES:
            raise _fail(where, line, f"relationship type {name!r} is reserved: the graph model links documents, "
                        f"chunks and entities with {' and '.join(sorted(RESERVED_RELATIONSHIP_TYPES))}; "
                        "choose another name")
        if name in relationship_names:
            raise _fail(where, line, f"relationship type {name!r} is defined twice")
        relationship_names.add(name)
        source = _type_list(raw, "source", where, line)
        target = _type_list(raw, "target", where, line)
        for end in (*source, *target):
            if end not in entity_names:
                known = sorted(entity_names)
                raise _fail(
                    where, line, f"relationship type {name!r} names unknown entity type {end!r}; "
                    f"known: {', '.join(known[:50])}{', ...' if len(known) > 50 else ''}"
                )
        relationships.append(
            RelationshipType(
                name=name, source=source, target=target,
                description=_text(raw, "description", where, line, False),
                renamed_from=_renamed_from(raw, name, RELATIONSHIP_TYPE_PATTERN, relationship_renames, where, line),
            )
        )
    defined: list[tuple[str, dict[str, tuple[str, int | None]], list[str]]] = [
        ("entity type", entity_renames, [e.name for e in entities]),
        ("relationship type", relationship_renames, [r.name for r in relationships]),
    ]
    for kind, renames, names in defined:
        for item_name in names:
            if item_name in renames:
                new_name, claim_line = renames[item_name]
                raise _fail(
                    where, claim_line, f"{new_name!r} says renamed_from {item_name!r}, but the file "
                    f"also defines {kind} {item_name!r}; a renamed type has only its new name"
                )

    prompt_version = data.get("prompt_version", 1)
    if not isinstance(prompt_version, int) or isinstance(prompt_version, bool) or prompt_version < 1:
        raise _fail(where, top_line, "'prompt_version' must be a whole number of at least 1")
    return DomainSchema(
        entity_types=tuple(entities), relationship_types=tuple(relationships), prompt_version=prompt_version
    )


MAX_SCHEMA_BYTES = 8 * 1024 * 1024


def parse_schema_file(path: Path) -> DomainSchema:
    """Read and validate a schema file; every problem is a SchemaFileError naming the file and line."""
    try:
        # Opened without blocking and checked before reading: a FIFO or device would hang or never end.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise SchemaFileError(f"schema file {path} is not a regular file; pass the path of a YAML or JSON file")
            data = handle.read(MAX_SCHEMA_BYTES + 1)
        if len(data) > MAX_SCHEMA_BYTES:
            raise SchemaFileError(f"schema file {path} is larger than {MAX_SCHEMA_BYTES // 1024 // 1024} MiB; "
                                  "a schema is a list of types, not data")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SchemaFileError(f"schema file {path} does not exist; pass the path of a YAML or JSON file") from None
    except IsADirectoryError:
        raise SchemaFileError(f"schema file {path} is a folder; pass the path of a YAML or JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaFileError(f"schema file {path} cannot be read as UTF-8 text ({exc})") from None
    return parse_schema_text(text, where=str(path))


def schema_from_json(data: dict[str, Any]) -> DomainSchema:
    """Rebuild a stored schema (the database keeps `DomainSchema.to_json()`)."""
    return DomainSchema.model_validate(data)
