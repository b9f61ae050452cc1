"""The extraction prompt: a fixed template plus the KB's schema version and one chunk's text.

The schema goes into the system message as a JSON block between `<schema>` tags and the chunk into
the user message between `<chunk>` tags. The system message is identical for every chunk of a
schema version, so providers with prompt caching bill it once; and because the schema is embedded
as JSON, the offline model and the fake server read it back with `read_prompt` instead of being
told the schema some other way.

`PROMPT_VERSION` is the template's version. Bump it whenever the wording or the answer shape
changes: it is part of every chunk checkpoint's key (see `effective_prompt_version`), so a new
template makes every chunk eligible for extraction again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lumikb_pipeline.domain.chunking import count_tokens
from lumikb_pipeline.domain.schema import DomainSchema

PROMPT_VERSION = 1

# The schema's own prompt_version is packed below the template version in one integer, because the
# checkpoint table has a single integer column for "the prompt that produced this result".
_SCHEMA_PROMPT_VERSION_SPAN = 100_000

# The rules and the answer's shape, shared by the full and the delta prompt (their text is part of
# every checkpoint's key through the prompt versions below: change it only with a version bump).
_RULE_TYPES = """\
1. Extract only entities of the entity types listed in the schema below, and only relationships of \
the relationship types listed there.
"""
_RULES_NAMES_TO_ANSWER = """\
3. Use each entity's name as written in the text (the most complete form). Never invent entities \
that the text does not mention.
4. Descriptions are one short sentence grounded in the text.
5. Answer with one JSON object and nothing else: no prose, no code fences, no comments.

The answer has exactly this shape:
{{"entities": [{{"name": "...", "type": "<entity type>", "description": "..."}}],
 "relationships": [{{"source": "<entity name>", "source_type": "<entity type>", \
"target": "<entity name>", "target_type": "<entity type>", "type": "<relationship type>", \
"description": "..."}}]}}
If the chunk mentions nothing of these types, answer {{"entities": [], "relationships": []}}.
"""

_SYSTEM_TEMPLATE = (
    "You extract a knowledge graph from one chunk of a document. You follow a fixed domain schema.\n\nRules:\n"
    + _RULE_TYPES
    + "2. A relationship's source must have one of the relationship type's allowed source entity types "
    "and its target one of its allowed target entity types. Both ends must also be listed as entities.\n"
    + _RULES_NAMES_TO_ANSWER
    + "\nThe domain schema:\n<schema>\n{schema_json}\n</schema>"
)

# A delta prompt (schema evolution, `delta` strategy) asks only for types added to a schema, with the
# chunk's already-extracted entities as context. Bump DELTA_PROMPT_VERSION when its wording changes:
# it is part of the key of every derived checkpoint (`derived_prompt_version`).
DELTA_PROMPT_VERSION = 1

_DELTA_SYSTEM_TEMPLATE = (
    "You extract a knowledge graph from one chunk of a document. The chunk was already extracted under a "
    "domain schema that has since gained new types: you extract only what the new types add.\n\nRules:\n"
    + _RULE_TYPES
    + "2. A relationship's source must have one of the relationship type's allowed source entity types "
    "and its target one of its allowed target entity types. An end may be an entity you list or one of "
    "the chunk's known entities (given with the chunk, with their types); do not list known entities again.\n"
    + _RULES_NAMES_TO_ANSWER
    + "\nThe new types:\n<schema>\n{schema_json}\n</schema>"
)

_DELTA_USER_TEMPLATE = """\
The entities already known in this chunk:
<known_entities>
{known_json}
</known_entities>
Extract the entities and relationships of the new types from this chunk.
<chunk>
{text}
</chunk>"""

_USER_TEMPLATE = """\
Extract the entities and relationships from this chunk.
<chunk>
{text}
</chunk>"""

_SCHEMA_BLOCK = re.compile(r"<schema>\n(.*?)\n</schema>", re.DOTALL)
_KNOWN_BLOCK = re.compile(r"<known_entities>\n(.*?)\n</known_entities>", re.DOTALL)
_CHUNK_START = "<chunk>\n"
_CHUNK_END = "\n</chunk>"


def effective_prompt_version(schema: DomainSchema) -> int:
    """The prompt version stored in checkpoints: the template's version combined with the schema's.

    Either one changing gives a different number, so checkpoints of the old prompt no longer match.
    """
    if schema.prompt_version >= _SCHEMA_PROMPT_VERSION_SPAN:
        raise ValueError(
            f"schema prompt_version {schema.prompt_version} is too large; use a number below "
            f"{_SCHEMA_PROMPT_VERSION_SPAN}"
        )
    return PROMPT_VERSION * _SCHEMA_PROMPT_VERSION_SPAN + schema.prompt_version


def derived_prompt_version(schema: DomainSchema) -> int:
    """The prompt version of a *derived* checkpoint: a chunk's extraction at a schema version made
    from its extraction at an earlier version (migrated, plus a delta answer when types were added).

    Negative, so it never equals a full extraction's (`effective_prompt_version`): a derived result
    is never taken for a full one (`--strategy full` still calls the LLM), and a new delta template
    or extraction prompt makes derived results eligible again.
    """
    return -(DELTA_PROMPT_VERSION * 10_000_000 + effective_prompt_version(schema))


def schema_block(schema: DomainSchema) -> dict[str, Any]:
    """The schema as the prompt shows it: types with descriptions and allowed endpoints."""
    return {
        "entity_types": [{"name": e.name, "description": e.description} for e in schema.entity_types],
        "relationship_types": [
            {"name": r.name, "source": list(r.source), "target": list(r.target), "description": r.description}
            for r in schema.relationship_types
        ],
        "prompt_version": schema.prompt_version,
    }


def build_messages(schema: DomainSchema, text: str) -> list[dict[str, str]]:
    """The chat messages that ask the model to extract `text` under `schema`."""
    schema_json = json.dumps(schema_block(schema), ensure_ascii=False)
    return [
        {"role": "system", "content": _SYSTEM_TEMPLATE.format(schema_json=schema_json)},
        {"role": "user", "content": _USER_TEMPLATE.format(text=text)},
    ]


def build_delta_messages(
    ask: DomainSchema, text: str, known: Sequence[tuple[str, str]]
) -> list[dict[str, str]]:
    """The chat messages that ask only for `ask`'s types in `text`, given the chunk's `known`
    (name, type) entities. `ask`'s relationship types may name entity types it does not list: those
    ends are known entities."""
    schema_json = json.dumps(schema_block(ask), ensure_ascii=False)
    known_json = json.dumps([{"name": name, "type": type_name} for name, type_name in known], ensure_ascii=False)
    return [
        {"role": "system", "content": _DELTA_SYSTEM_TEMPLATE.format(schema_json=schema_json)},
        {"role": "user", "content": _DELTA_USER_TEMPLATE.format(known_json=known_json, text=text)},
    ]


# OpenAI's chat format: every message costs 3 tokens of framing, and 3 more prime the reply.
_TOKENS_PER_MESSAGE = 3
_REPLY_PRIMING_TOKENS = 3


def chat_prompt_tokens(messages: Sequence[Mapping[str, Any]], *, priming: bool = True) -> int:
    """The prompt tokens of chat `messages` as OpenAI counts them: each message's text in
    cl100k_base plus its framing, plus the reply's priming (`priming=False` for a part of a prompt)."""
    total = sum(count_tokens(_content_text(m.get("content"))) + _TOKENS_PER_MESSAGE for m in messages)
    return total + (_REPLY_PRIMING_TOKENS if priming else 0)


class PromptFormatError(ValueError):
    """The messages were not built by `build_messages` (no schema block or no chunk block)."""


def read_prompt(messages: Sequence[Mapping[str, Any]]) -> tuple[DomainSchema, str]:
    """The schema and chunk text embedded in messages built by `build_messages`."""
    schema, text, _ = read_prompt_request(messages)
    return schema, text


def read_prompt_request(
    messages: Sequence[Mapping[str, Any]]
) -> tuple[DomainSchema, str, list[tuple[str, str]]]:
    """The schema, chunk text and known (name, type) entities (empty for a full extraction prompt)
    embedded in messages built by `build_messages` or `build_delta_messages`.

    Used by the offline model and the fake server, which answer from the prompt alone.
    """
    schema: DomainSchema | None = None
    text: str | None = None
    known: list[tuple[str, str]] = []
    for message in messages:
        content = _content_text(message.get("content"))
        if schema is None and (match := _SCHEMA_BLOCK.search(content)):
            try:
                schema = DomainSchema.model_validate(json.loads(match.group(1)))
            except ValueError as exc:
                raise PromptFormatError(f"the schema block is not a valid schema: {exc}") from None
        elif message.get("role") == "user" and _CHUNK_START in content:
            # The chunk text may itself contain the tags: it runs from the first start tag to the last end.
            head = content[: content.index(_CHUNK_START)]
            if known_match := _KNOWN_BLOCK.search(head):
                try:
                    known = [(str(e["name"]), str(e["type"])) for e in json.loads(known_match.group(1))]
                except (ValueError, KeyError, TypeError) as exc:
                    raise PromptFormatError(f"the known-entities block is not a list of names and types: {exc}") \
                        from None
            start = content.index(_CHUNK_START) + len(_CHUNK_START)
            end = content.rfind(_CHUNK_END)
            text = content[start:end] if end >= start else content[start:]
    if schema is None or text is None:
        raise PromptFormatError("the prompt has no <schema> block or no <chunk> block")
    return schema, text, known


def _content_text(content: Any) -> str:
    # OpenAI-style content may be a list of parts; only text parts matter here.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
