"""Parsing and validating the model's answer: what is kept, what is dropped (and why), what is unusable."""

from __future__ import annotations

import json

import pytest

from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm.parse import UnusableAnswer, answer_format, parse_answer

ACME = {"name": "Acme Corp", "type": "Organization", "description": "A company."}
JANE = {"name": "Jane Doe", "type": "Person", "description": "An engineer."}
BERLIN = {"name": "Berlin", "type": "Location", "description": "A city."}
EMPLOYS = {"source": "Acme Corp", "source_type": "Organization", "target": "Jane Doe", "target_type": "Person",
           "type": "EMPLOYS", "description": "Acme employs Jane."}
JANE_IN_BERLIN = {"source": "Jane Doe", "source_type": "Person", "target": "Berlin", "target_type": "Location",
                  "type": "LOCATED_IN", "description": "Jane lives in Berlin."}


def answer(entities: list[dict[str, str]], relationships: list[dict[str, str]] | None = None) -> str:
    return json.dumps({"entities": entities, "relationships": relationships or []})


def test_a_valid_answer_becomes_typed_items(schema_v1: DomainSchema) -> None:
    parsed = parse_answer(answer([ACME, JANE, BERLIN], [EMPLOYS, JANE_IN_BERLIN]), schema_v1)

    assert [(e.name, e.type) for e in parsed.entities] == [
        ("Acme Corp", "Organization"), ("Jane Doe", "Person"), ("Berlin", "Location")
    ]
    assert [(r.source, r.type, r.target) for r in parsed.relationships] == [
        ("Acme Corp", "EMPLOYS", "Jane Doe"), ("Jane Doe", "LOCATED_IN", "Berlin")
    ]
    assert parsed.dropped == [] and not parsed.repaired


def test_json_in_a_code_fence_with_trailing_commas_is_repaired(schema_v1: DomainSchema) -> None:
    text = "```json\n{'entities': [{'name': 'Acme Corp', 'type': 'Organization', 'description': 'x'},],}\n```"

    parsed = parse_answer(text, schema_v1)

    assert [e.name for e in parsed.entities] == ["Acme Corp"] and parsed.repaired


def test_json_after_a_sentence_of_prose_is_used(schema_v1: DomainSchema) -> None:
    parsed = parse_answer("Here is the graph: " + answer([ACME]), schema_v1)

    assert [e.name for e in parsed.entities] == ["Acme Corp"]


@pytest.mark.parametrize("content", [None, "", "   \n"])
def test_an_empty_answer_is_unusable(schema_v1: DomainSchema, content: str | None) -> None:
    with pytest.raises(UnusableAnswer) as info:
        parse_answer(content, schema_v1)
    assert info.value.code == "empty_answer"


def test_prose_is_unusable(schema_v1: DomainSchema) -> None:
    with pytest.raises(UnusableAnswer) as info:
        parse_answer("Sure! The text mentions Acme Corp and Jane Doe.", schema_v1)
    assert info.value.code == "prose_answer" and "Acme Corp" in info.value.message


@pytest.mark.parametrize("content", ["[1, 2]", '{"nodes": []}', '"just a string"', '{"entities": {"a": 1}}'])
def test_json_of_the_wrong_shape_is_unusable(schema_v1: DomainSchema, content: str) -> None:
    with pytest.raises(UnusableAnswer) as info:
        parse_answer(content, schema_v1)
    assert info.value.code == "wrong_shape"


def test_an_answer_cut_off_before_anything_usable_is_unusable(schema_v1: DomainSchema) -> None:
    with pytest.raises(UnusableAnswer) as info:
        parse_answer('{"entit', schema_v1, finish_reason="length")
    assert info.value.code == "truncated_answer" and "max_tokens" in info.value.message


def test_an_answer_cut_in_its_first_item_is_unusable_not_empty(schema_v1: DomainSchema) -> None:
    with pytest.raises(UnusableAnswer) as info:
        parse_answer('{"entities": [{"name": "Acme', schema_v1, finish_reason="length")
    assert info.value.code == "truncated_answer"


def test_a_truncated_answer_keeps_its_complete_items_and_drops_the_one_it_was_cut_in(
    schema_v1: DomainSchema,
) -> None:
    full = answer([ACME, JANE, BERLIN], [EMPLOYS, JANE_IN_BERLIN])
    cut = full[: full.index('"target": "Berlin"') + len('"target": "Ber')]

    parsed = parse_answer(cut, schema_v1, finish_reason="length")

    assert [e.name for e in parsed.entities] == ["Acme Corp", "Jane Doe", "Berlin"]
    assert [r.type for r in parsed.relationships] == ["EMPLOYS"]
    assert [(d.kind, d.reason) for d in parsed.dropped] == [("relationship", "truncated")]


def test_a_truncated_answer_without_relationships_drops_its_last_entity(schema_v1: DomainSchema) -> None:
    full = answer([ACME, JANE])
    cut = full[: full.index('"Jane D') + len('"Jane D')]

    parsed = parse_answer(cut, schema_v1)  # no finish_reason: the missing closing brace tells

    assert [e.name for e in parsed.entities] == ["Acme Corp"]
    assert [(d.kind, d.reason) for d in parsed.dropped] == [("entity", "truncated")]


def test_items_of_unknown_types_are_dropped_and_counted(schema_v1: DomainSchema) -> None:
    spaceship = {"name": "Enterprise", "type": "Spaceship", "description": ""}
    orbits = {**EMPLOYS, "type": "ORBITS"}
    odd_end = {**EMPLOYS, "target_type": "Robot"}

    parsed = parse_answer(answer([ACME, JANE, spaceship], [EMPLOYS, orbits, odd_end]), schema_v1)

    assert {e.type for e in parsed.entities} == {"Organization", "Person"}
    assert [r.type for r in parsed.relationships] == ["EMPLOYS"]
    assert sorted((d.kind, d.reason) for d in parsed.dropped) == [
        ("entity", "unknown_type"), ("relationship", "unknown_type"), ("relationship", "unknown_type")
    ]
    assert "Spaceship" in parsed.dropped[0].detail


def test_relationships_between_types_the_schema_does_not_allow_are_dropped(schema_v1: DomainSchema) -> None:
    backwards = {**EMPLOYS, "source": "Jane Doe", "source_type": "Person", "target": "Acme Corp",
                 "target_type": "Organization"}
    city_employs = {**EMPLOYS, "source": "Berlin", "source_type": "Location"}

    parsed = parse_answer(answer([ACME, JANE, BERLIN], [backwards, city_employs]), schema_v1)

    assert parsed.relationships == []
    assert [d.reason for d in parsed.dropped] == ["endpoint_not_allowed", "endpoint_not_allowed"]


def test_items_with_empty_names_are_dropped(schema_v1: DomainSchema) -> None:
    nameless = {"name": "  ", "type": "Person", "description": ""}
    no_target = {**EMPLOYS, "target": ""}

    parsed = parse_answer(answer([ACME, nameless], [no_target]), schema_v1)

    assert [e.name for e in parsed.entities] == ["Acme Corp"]
    assert [(d.kind, d.reason) for d in parsed.dropped] == [("entity", "empty_name"), ("relationship", "empty_name")]


def test_items_that_are_not_objects_of_text_are_dropped(schema_v1: DomainSchema) -> None:
    parsed = parse_answer(json.dumps({"entities": ["Acme", {"name": 42, "type": "Person"}, ACME]}), schema_v1)

    assert [e.name for e in parsed.entities] == ["Acme Corp"]
    assert [d.reason for d in parsed.dropped] == ["malformed_item", "malformed_item"]


def test_types_differing_only_in_case_are_mapped_to_the_schema_spelling(schema_v1: DomainSchema) -> None:
    parsed = parse_answer(answer([{**ACME, "type": "organization"}], [{**EMPLOYS, "type": "employs"}]), schema_v1)

    assert [e.type for e in parsed.entities][0] == "Organization"
    assert [r.type for r in parsed.relationships] == ["EMPLOYS"]


def test_duplicates_are_merged_and_relationship_endpoints_become_entities(schema_v1: DomainSchema) -> None:
    parsed = parse_answer(answer([ACME, {**ACME, "name": "ACME CORP", "description": "A larger company."}],
                                 [EMPLOYS, EMPLOYS]), schema_v1)

    assert [(e.name, e.description) for e in parsed.entities] == [
        ("Acme Corp", "A larger company."), ("Jane Doe", "")
    ]
    assert len(parsed.relationships) == 1


def test_the_structured_output_format_lists_exactly_the_schema_types(schema_v1: DomainSchema) -> None:
    schema = answer_format(schema_v1)["json_schema"]["schema"]
    entity = schema["properties"]["entities"]["items"]["properties"]
    relationship = schema["properties"]["relationships"]["items"]["properties"]

    assert entity["type"]["enum"] == ["Organization", "Person", "Location"]
    assert relationship["type"]["enum"] == ["EMPLOYS", "LOCATED_IN"]
    assert answer_format(schema_v1)["json_schema"]["strict"] is True
