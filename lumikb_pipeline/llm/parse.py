"""From the model's answer to validated, typed items.

Two steps, with different failure modes:

1. **The answer as a whole** (`parse_answer`). Models that support structured output get a JSON
   schema `response_format` (`answer_format`) and answer valid JSON; others get JSON mode and may
   still wrap the JSON in prose or code fences, leave trailing commas, or be cut off at the token
   limit. Strict JSON is tried first, then `json_repair` on the part from the first `{`. An answer
   that yields no object of the expected shape is *unusable* (`UnusableAnswer`: empty, prose,
   truncated beyond repair, wrong shape); the extractor retries it and finally records the chunk as
   failed with the reason.
   A truncated answer that repairs to the right shape is used, minus its last item: JSON is written
   in order, so everything before the cut is complete and only the item being written when the
   answer was cut may be damaged (a name cut in half would otherwise become an entity).
2. **Each item** (`validate_items`). Items that break the schema are dropped, each counted with its
   reason (`DroppedItem`), and the rest is kept:
   - `malformed_item`: not an object, or a field that is not text;
   - `empty_name`: an entity, source or target without a name;
   - `unknown_type`: an entity or relationship type (or an endpoint's type) the schema lacks;
   - `endpoint_not_allowed`: a relationship type used between entity types it does not allow;
   - `truncated`: the item the answer was cut in;
   - `invalid_text`: a name longer than `MAX_NAME_CHARS`, a description longer than
     `MAX_DESCRIPTION_CHARS`, a lone surrogate, or a control character (other than tab and newline in
     a description). Such an item could never be written; refusing it here keeps it out of the
     chunk's checkpoint, so it cannot fail the document on every retry.
   Types are matched exactly, else case-insensitively when that names exactly one schema type.
   Duplicate entities (same type and case-folded name) and relationships are merged; a
   relationship endpoint not listed among the entities is added as an entity, because the
   relationship already says its name and (valid) type.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import json_repair

from lumikb_pipeline.domain.results import DroppedItem, ExtractedEntity, ExtractedRelationship
from lumikb_pipeline.domain.schema import DomainSchema

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", re.DOTALL)
_DETAIL_CHARS = 200
# A name is an entity's name, not a passage: the graph keys entities by at most 512 characters.
MAX_NAME_CHARS = 512
# One description; the graph bounds a merged description at the same size.
MAX_DESCRIPTION_CHARS = 16_384
# Control characters (C0, DEL, C1) and lone surrogates; tab and newline are allowed in descriptions.
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_DESCRIPTION_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


class UnusableAnswer(Exception):
    """The answer as a whole cannot be used; `code` is stable, the message says what was wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class ParsedAnswer:
    """The validated items of one answer and what was dropped from it."""

    entities: list[ExtractedEntity] = field(default_factory=list)
    relationships: list[ExtractedRelationship] = field(default_factory=list)
    dropped: list[DroppedItem] = field(default_factory=list)
    repaired: bool = False  # the answer was not strict JSON and needed json_repair


def answer_format(schema: DomainSchema) -> dict[str, Any]:
    """The structured-output `response_format` (OpenAI JSON schema, strict) for `schema`.

    Types are enums, so a model that honours the schema cannot name an unknown type.
    """
    entity = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "type": {"type": "string", "enum": [t.name for t in schema.entity_types]},
            "description": {"type": "string"},
        },
        "required": ["name", "type", "description"],
        "additionalProperties": False,
    }
    relationships: dict[str, Any] = {"type": "array", "maxItems": 0, "items": {"type": "object"}}
    if schema.relationship_types:
        entity_type = {"type": "string", "enum": [t.name for t in schema.entity_types]}
        relationships = {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "source": {"type": "string"},
                    "source_type": entity_type,
                    "target": {"type": "string"},
                    "target_type": entity_type,
                    "type": {"type": "string", "enum": [r.name for r in schema.relationship_types]},
                    "description": {"type": "string"},
                },
                "required": ["source", "source_type", "target", "target_type", "type", "description"],
                "additionalProperties": False,
            },
        }
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "knowledge_graph_extraction",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"entities": {"type": "array", "items": entity}, "relationships": relationships},
                "required": ["entities", "relationships"],
                "additionalProperties": False,
            },
        },
    }


def parse_answer(content: str | None, schema: DomainSchema, finish_reason: str | None = None) -> ParsedAnswer:
    """Parse and validate one answer; raise `UnusableAnswer` when it cannot be used at all."""
    text = (content or "").strip()
    if not text:
        raise UnusableAnswer("empty_answer", "the model answered with nothing")
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    truncated = finish_reason == "length"
    data: Any
    repaired = False
    try:
        data = json.loads(text)
    except RecursionError:
        raise UnusableAnswer("wrong_shape", "the answer nests too deeply to be an extraction") from None
    except ValueError:
        start = text.find("{")
        if start < 0:
            raise UnusableAnswer(
                "prose_answer", f"the model answered with text, not JSON: {_excerpt(text)!r}"
            ) from None
        # A JSON answer that does not end with its closing brace was cut off, whatever the reason said.
        truncated = truncated or not text.rstrip().endswith("}")
        try:
            data = json_repair.loads(text[start:])
        except RecursionError:
            raise UnusableAnswer("wrong_shape", "the answer nests too deeply to be an extraction") from None
        repaired = True
    cut_off = UnusableAnswer("truncated_answer", "the answer was cut off before any usable part "
                             "(finish_reason=length); raise the model's max_tokens or use smaller chunks")
    if not _has_answer_shape(data):
        if truncated:
            raise cut_off
        raise UnusableAnswer(
            "wrong_shape", f"the answer is not an object with 'entities' and 'relationships': {_excerpt(text)!r}"
        )
    parsed = validate_items(data, schema, truncated=truncated)
    if truncated and not parsed.entities and not parsed.relationships:
        # Cut in its first item: an empty result here would claim "nothing in this chunk".
        raise cut_off
    parsed.repaired = repaired
    return parsed


def _has_answer_shape(data: Any) -> bool:
    if not isinstance(data, dict) or not ("entities" in data or "relationships" in data):
        return False
    return all(isinstance(data.get(k, []), list) for k in ("entities", "relationships"))


def _excerpt(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."


class _TypeResolver:
    """Maps a type as the model wrote it to the schema's spelling (exact, else unique case-insensitive)."""

    def __init__(self, names: list[str]) -> None:
        self.exact = set(names)
        folded: dict[str, list[str]] = {}
        for name in names:
            folded.setdefault(name.casefold(), []).append(name)
        self.folded = {k: v[0] for k, v in folded.items() if len(v) == 1}

    def __call__(self, value: str) -> str | None:
        value = value.strip()
        return value if value in self.exact else self.folded.get(value.casefold())


def validate_items(data: dict[str, Any], schema: DomainSchema, *, truncated: bool = False) -> ParsedAnswer:
    """Keep the items of an answer-shaped object that fit `schema`; drop and count the others."""
    raw_entities = list(data.get("entities") or [])
    raw_relationships = list(data.get("relationships") or [])
    out = ParsedAnswer()
    if truncated:
        # Only the last item written can have been cut: the last relationship if there are any
        # (they come after the entities), else the last entity.
        victim_list, kind = (raw_relationships, "relationship") if raw_relationships else (raw_entities, "entity")
        if victim_list:
            out.dropped.append(DroppedItem(kind=kind, reason="truncated", detail=_describe(victim_list.pop())))

    entity_type = _TypeResolver([t.name for t in schema.entity_types])
    relationship_type = _TypeResolver([r.name for r in schema.relationship_types])
    entities: dict[tuple[str, str], ExtractedEntity] = {}

    for raw in raw_entities:
        fields = _text_fields(raw, ("name", "type", "description"))
        if fields is None:
            out.dropped.append(DroppedItem(kind="entity", reason="malformed_item", detail=_describe(raw)))
            continue
        name, type_name = fields["name"].strip(), entity_type(fields["type"])
        if problem := _text_problem(fields, ("name",), ("description",)):
            out.dropped.append(DroppedItem(kind="entity", reason="invalid_text", detail=f"{problem}: {_describe(raw)}"))
        elif not name:
            out.dropped.append(DroppedItem(kind="entity", reason="empty_name", detail=_describe(raw)))
        elif type_name is None:
            out.dropped.append(DroppedItem(kind="entity", reason="unknown_type",
                                           detail=_safe(f"{name!r} has type {fields['type']!r}")))
        else:
            key = (type_name, name.casefold())
            if key not in entities or len(fields["description"]) > len(entities[key].description):
                # On duplicates keep the first spelling and the fullest description.
                spelling = entities[key].name if key in entities else name
                entities[key] = ExtractedEntity(
                    name=spelling, type=type_name, description=fields["description"].strip()
                )

    relationships: dict[tuple[str, str, str, str, str], ExtractedRelationship] = {}
    for raw in raw_relationships:
        fields = _text_fields(raw, ("source", "source_type", "target", "target_type", "type", "description"))
        if fields is None:
            out.dropped.append(DroppedItem(kind="relationship", reason="malformed_item", detail=_describe(raw)))
            continue
        source, target = fields["source"].strip(), fields["target"].strip()
        rel = relationship_type(fields["type"])
        source_type, target_type = entity_type(fields["source_type"]), entity_type(fields["target_type"])
        summary = _safe(f"{source!r} ({fields['source_type']}) -{fields['type']}-> "
                        f"{target!r} ({fields['target_type']})")
        if problem := _text_problem(fields, ("source", "target"), ("description",)):
            out.dropped.append(DroppedItem(kind="relationship", reason="invalid_text", detail=f"{problem}: {summary}"))
        elif not source or not target:
            out.dropped.append(DroppedItem(kind="relationship", reason="empty_name", detail=summary))
        elif rel is None or source_type is None or target_type is None:
            out.dropped.append(DroppedItem(kind="relationship", reason="unknown_type", detail=summary))
        elif not schema.allows_relationship(rel, source_type, target_type):
            out.dropped.append(DroppedItem(kind="relationship", reason="endpoint_not_allowed", detail=summary))
        else:
            for name, type_name in ((source, source_type), (target, target_type)):
                entities.setdefault((type_name, name.casefold()),
                                    ExtractedEntity(name=name, type=type_name, description=""))
            rel_key = (rel, source_type, source.casefold(), target_type, target.casefold())
            if rel_key not in relationships:
                relationships[rel_key] = ExtractedRelationship(
                    source=entities[(source_type, source.casefold())].name, source_type=source_type,
                    target=entities[(target_type, target.casefold())].name, target_type=target_type,
                    type=rel, description=fields["description"].strip(),
                )
    out.entities = list(entities.values())
    out.relationships = list(relationships.values())
    return out


def _text_fields(raw: Any, names: tuple[str, ...]) -> dict[str, str] | None:
    """The item's fields as text (missing ones empty), or None when it is not an object of text."""
    if not isinstance(raw, dict):
        return None
    fields: dict[str, str] = {}
    for name in names:
        value = raw.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            return None
        fields[name] = value
    return fields


def _text_problem(fields: dict[str, str], names: tuple[str, ...], descriptions: tuple[str, ...]) -> str | None:
    """Why an item's text could not be stored as written, or None."""
    for key in names:
        if len(fields[key]) > MAX_NAME_CHARS:
            return f"'{key}' is {len(fields[key])} characters long; a name has at most {MAX_NAME_CHARS}"
        if bad := _BAD_NAME_CHARS.search(fields[key]):
            return f"'{key}' holds the character U+{ord(bad.group()):04X} (a control character or lone surrogate)"
    for key in descriptions:
        if len(fields[key]) > MAX_DESCRIPTION_CHARS:
            return f"'{key}' is {len(fields[key])} characters long; at most {MAX_DESCRIPTION_CHARS} are kept"
        if bad := _BAD_DESCRIPTION_CHARS.search(fields[key]):
            return f"'{key}' holds the character U+{ord(bad.group()):04X} (a control character or lone surrogate)"
    return None


def _safe(text: str) -> str:
    """`text` with lone surrogates escaped so that it can be stored anywhere, cut to an excerpt (after
    escaping: an escaped surrogate takes six characters, so cutting first could leave six times the bound)."""
    return _excerpt(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _describe(raw: Any) -> str:
    try:
        return _safe(json.dumps(raw, ensure_ascii=False, default=str)[: _DETAIL_CHARS + 3])
    except (RecursionError, ValueError):
        return f"(an unprintable {type(raw).__name__})"
