"""A hostile or oversized item of a model's answer is dropped at parse time with its reason, and the
rest of the chunk is kept, so it never reaches a checkpoint or fails a write (issue 15)."""

from __future__ import annotations

import json

import pytest

from lumikb_pipeline.domain.schema import parse_schema_text
from lumikb_pipeline.llm.parse import MAX_NAME_CHARS, UnusableAnswer, parse_answer

SCHEMA = parse_schema_text("""
entity_types: [{name: Person}, {name: Organization}]
relationship_types: [{name: WORKS_AT, source: [Person], target: [Organization]}]
""")
GOOD = {"name": "Jane Doe", "type": "Person", "description": "an engineer"}


@pytest.mark.parametrize("bad_name, why", [
    ("A" * 70_000, "characters long"),
    ("Jane\ud800Doe", "U+D800"),
    ("Jane\x00Doe", "U+0000"),
    ("Jane\x1b[31mDoe", "U+001B"),
    ("line\nbreak", "U+000A"),
])
def test_a_hostile_entity_name_is_dropped_with_its_reason_and_the_rest_kept(bad_name: str, why: str) -> None:
    answer = {"entities": [GOOD, {"name": bad_name, "type": "Organization", "description": ""}], "relationships": []}
    parsed = parse_answer(json.dumps(answer), SCHEMA)
    assert [e.name for e in parsed.entities] == ["Jane Doe"]
    [dropped] = parsed.dropped
    assert dropped.reason == "invalid_text" and why in dropped.detail
    assert len(dropped.detail) < 1000
    dropped.detail.encode("utf-8")  # storable: no lone surrogate left in the reason


def test_a_hostile_relationship_endpoint_or_description_is_dropped() -> None:
    answer = {"entities": [GOOD], "relationships": [
        {"source": "Jane Doe", "source_type": "Person", "target": "X" * (MAX_NAME_CHARS + 1),
         "target_type": "Organization", "type": "WORKS_AT", "description": ""},
        {"source": "Jane Doe", "source_type": "Person", "target": "Acme", "target_type": "Organization",
         "type": "WORKS_AT", "description": "bad \udc00 text"},
        {"source": "Jane Doe", "source_type": "Person", "target": "Initech", "target_type": "Organization",
         "type": "WORKS_AT", "description": "multi\nline\tis fine"},
    ]}
    parsed = parse_answer(json.dumps(answer), SCHEMA)
    assert [r.target for r in parsed.relationships] == ["Initech"]
    assert [d.reason for d in parsed.dropped] == ["invalid_text", "invalid_text"]
    assert {e.name for e in parsed.entities} == {"Jane Doe", "Initech"}


def test_a_description_longer_than_the_limit_is_dropped() -> None:
    answer = {"entities": [GOOD, {"name": "Acme", "type": "Organization", "description": "d" * 20_000}],
              "relationships": []}
    parsed = parse_answer(json.dumps(answer), SCHEMA)
    assert [e.name for e in parsed.entities] == ["Jane Doe"]
    assert parsed.dropped[0].reason == "invalid_text"


def test_an_answer_nested_too_deeply_is_unusable_not_a_crash() -> None:
    with pytest.raises(UnusableAnswer):
        parse_answer('{"entities": ' + "[" * 100_000 + "]" * 100_000 + "}", SCHEMA)
    with pytest.raises(UnusableAnswer):
        parse_answer('noise {"entities": ' + "[" * 100_000, SCHEMA)


def test_an_unknown_type_with_a_lone_surrogate_gives_a_storable_reason() -> None:
    answer = {"entities": [GOOD, {"name": "Acme", "type": "Org\ud800", "description": ""}], "relationships": []}
    parsed = parse_answer(json.dumps(answer), SCHEMA)
    [dropped] = parsed.dropped
    assert dropped.reason == "unknown_type"
    dropped.detail.encode("utf-8")


def test_the_reason_of_a_name_of_lone_surrogates_stays_short_once_escaped() -> None:
    # Found by the fuzz test: each escaped surrogate takes six characters, so a reason cut before
    # escaping grew to six times its bound.
    content = json.dumps({"entities": [{"name": "\udc80" * 400, "type": "Person"}], "relationships": []})
    parsed = parse_answer(content, SCHEMA, "stop")
    (dropped,) = parsed.dropped
    assert dropped.reason == "invalid_text" and len(dropped.detail) < 300
    dropped.detail.encode("utf-8")
