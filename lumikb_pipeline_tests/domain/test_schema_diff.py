"""The schema diff and the strategy it implies (PRODUCT.md section 7), and applying it to a chunk."""

from __future__ import annotations

import pytest

from lumikb_pipeline.core.errors import SchemaFileError, UsageError
from lumikb_pipeline.domain.results import ChunkExtraction, ExtractedEntity, ExtractedRelationship
from lumikb_pipeline.domain.schema import DomainSchema, parse_schema_text
from lumikb_pipeline.domain.schema_diff import (
    check_renames,
    delta_request,
    diff_schemas,
    merge_delta,
    migrate_extraction,
)

BASE = """\
entity_types:
  - {name: Organization, description: A company.}
  - {name: Person, description: A human.}
  - {name: Place, description: A city or country.}
relationship_types:
  - {name: EMPLOYS, source: [Organization], target: [Person], description: Employs.}
  - {name: LOCATED_IN, source: [Organization, Person], target: [Place], description: Is located in.}
"""


def schema(text: str) -> DomainSchema:
    return parse_schema_text(text)


def edit(*replacements: tuple[str, str]) -> DomainSchema:
    text = BASE
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    return schema(text)


def test_same_schema_is_strategy_none() -> None:
    diff = diff_schemas([schema(BASE), schema(BASE)], 1, 2)
    assert diff.strategy == "none"
    assert diff.to_json("kb") == {
        "kb": "kb", "from": 1, "to": 2,
        "entity_types": {"added": [], "removed": [], "renamed": {}, "changed": []},
        "relationship_types": {"added": [], "removed": [], "renamed": {}, "changed": []},
        "prompt_changed": False, "strategy": "none",
    }


def test_added_types_are_delta() -> None:
    new = schema(BASE + "  - {name: FOUNDED, source: [Person], target: [Organization], description: Founded.}\n")
    new = new.model_copy(update={"entity_types": (*new.entity_types, *schema(
        "entity_types:\n  - {name: Product, description: A product.}\n").entity_types)})
    diff = diff_schemas([schema(BASE), new], 1, 2)
    assert diff.entity_types.added == ("Product",)
    assert diff.relationship_types.added == ("FOUNDED",)
    assert diff.strategy == "delta"
    request = delta_request(diff)
    assert request.ask.entity_type_names == {"Product"}
    assert [r.name for r in request.ask.relationship_types] == ["FOUNDED"]
    assert request.validation_schema.entity_type_names == new.entity_type_names


def test_removed_type_and_narrowed_endpoints_are_graph_only() -> None:
    new = edit(("  - {name: Place, description: A city or country.}\n", ""),
               ("  - {name: LOCATED_IN, source: [Organization, Person], target: [Place], "
                "description: Is located in.}\n", ""))
    diff = diff_schemas([schema(BASE), new], 1, 2)
    assert diff.entity_types.removed == ("Place",)
    assert diff.relationship_types.removed == ("LOCATED_IN",)
    assert diff.strategy == "graph-only"

    narrowed = edit(("source: [Organization, Person]", "source: [Organization]"))
    diff = diff_schemas([schema(BASE), narrowed], 1, 2)
    assert diff.relationship_types.changed == ("LOCATED_IN",)
    assert diff.narrowed == ("LOCATED_IN",)
    assert diff.strategy == "graph-only"


def test_renames_are_graph_only_and_compose_across_versions() -> None:
    v2 = edit(("name: Organization, description", "name: Company, renamed_from: Organization, description"),
              ("[Organization]", "[Company]"), ("[Organization, Person]", "[Company, Person]"))
    v3 = schema(v2.model_dump_json())  # a JSON file is YAML: the stored form parses too
    v3 = v3.model_copy(update={"entity_types": tuple(
        t.model_copy(update={"name": "Firm", "renamed_from": "Company"}) if t.name == "Company"
        else t.model_copy(update={"renamed_from": None}) for t in v3.entity_types
    ), "relationship_types": tuple(
        t.model_copy(update={"source": tuple("Firm" if s == "Company" else s for s in t.source),
                             "renamed_from": "EMPLOYS" if t.name == "EMPLOYS" else None,
                             "name": "HIRES" if t.name == "EMPLOYS" else t.name})
        for t in v2.relationship_types
    )})
    assert diff_schemas([schema(BASE), v2], 1, 2).entity_types.renamed == {"Organization": "Company"}
    diff = diff_schemas([schema(BASE), v2, v3], 1, 3)
    assert diff.entity_types.renamed == {"Organization": "Firm"}
    assert diff.relationship_types.renamed == {"EMPLOYS": "HIRES"}
    assert diff.relationship_types.changed == ()
    assert diff.strategy == "graph-only"


@pytest.mark.parametrize(
    ("replacement", "reason"),
    [
        (("description: A human.", "description: A living human."), "description of entity type Person"),
        (("description: Employs.", "description: Pays."), "description of relationship type EMPLOYS"),
        (("target: [Person], description: Employs.", "target: [Person, Place], description: Employs."),
         "EMPLOYS allows new endpoint types"),
        (("relationship_types:", "prompt_version: 2\nrelationship_types:"), "prompt version changed"),
    ],
)
def test_changed_description_widened_endpoints_or_prompt_are_full(replacement: tuple[str, str], reason: str) -> None:
    diff = diff_schemas([schema(BASE), edit(replacement)], 1, 2)
    assert diff.strategy == "full"
    assert any(reason in r for r in diff.full_reasons)


def test_removed_then_added_again_is_the_same_type() -> None:
    without = edit(("  - {name: Place, description: A city or country.}\n", ""),
                   ("  - {name: LOCATED_IN, source: [Organization, Person], target: [Place], "
                    "description: Is located in.}\n", ""))
    diff = diff_schemas([schema(BASE), without, schema(BASE)], 1, 3)
    assert diff.strategy == "none"


def test_renamed_from_form_and_uniqueness_are_checked_in_the_file() -> None:
    with pytest.raises(SchemaFileError, match="line 3.*must match"):
        parse_schema_text("entity_types:\n  - name: A\n  - {name: B, renamed_from: lower}\n")
    with pytest.raises(SchemaFileError, match="line 3.*both say renamed_from 'X'"):
        parse_schema_text("entity_types:\n  - {name: A, renamed_from: X}\n  - {name: B, renamed_from: X}\n")
    with pytest.raises(SchemaFileError, match="line 2.*also defines entity type 'B'"):
        parse_schema_text("entity_types:\n  - {name: A, renamed_from: B}\n  - {name: B}\n")
    with pytest.raises(SchemaFileError, match="its own name"):
        parse_schema_text("entity_types:\n  - {name: A, renamed_from: A}\n")


def test_check_renames_refuses_an_unknown_old_name_and_drops_a_done_one() -> None:
    current = schema(BASE)
    with pytest.raises(UsageError, match="renamed_from 'Org'.*has no entity type of that name"):
        check_renames(current, edit(("name: Organization, description", "name: Company, renamed_from: Org, "
                                     "description"), ("[Organization]", "[Company]"),
                                    ("[Organization, Person]", "[Company, Person]")))
    kept = edit(("name: Person, description", "name: Person, renamed_from: Human, description"))
    assert check_renames(current, kept) == current


def _entity(name: str, type_: str) -> ExtractedEntity:
    return ExtractedEntity(name=name, type=type_, description=f"{name} is a {type_}")


def test_migrate_extraction_removes_renames_and_drops_disallowed_relationships() -> None:
    new = edit(("name: Organization, description", "name: Company, renamed_from: Organization, description"),
               ("[Organization]", "[Company]"), ("[Organization, Person]", "[Company]"))
    extraction = ChunkExtraction(
        chunk_id="c1",
        entities=[_entity("Acme", "Organization"), _entity("Jane", "Person"), _entity("Oslo", "Place")],
        relationships=[
            ExtractedRelationship(source="Acme", source_type="Organization", target="Jane", target_type="Person",
                                  type="EMPLOYS"),
            ExtractedRelationship(source="Jane", source_type="Person", target="Oslo", target_type="Place",
                                  type="LOCATED_IN"),
            ExtractedRelationship(source="Acme", source_type="Organization", target="Oslo", target_type="Place",
                                  type="LOCATED_IN"),
        ],
        llm_calls=1, prompt_tokens=100, completion_tokens=50,
    )
    diff = diff_schemas([schema(BASE), new], 1, 2)
    assert diff.strategy == "graph-only"
    migrated = migrate_extraction(extraction, diff)
    assert {(e.name, e.type) for e in migrated.entities} == {("Acme", "Company"), ("Jane", "Person"),
                                                              ("Oslo", "Place")}
    assert {(r.source, r.type, r.target) for r in migrated.relationships} == {("Acme", "EMPLOYS", "Jane"),
                                                                              ("Acme", "LOCATED_IN", "Oslo")}
    assert migrated.llm_calls == 0 and migrated.prompt_tokens == 0


def test_merge_delta_keeps_only_asked_types_and_adds_relationship_endpoints() -> None:
    new = schema(BASE.replace("relationship_types:", "  - {name: Product, description: A product.}\n"
                              "relationship_types:")
                 + "  - {name: MAKES, source: [Organization], target: [Product], description: Makes.}\n")
    diff = diff_schemas([schema(BASE), new], 1, 2)
    request = delta_request(diff)
    base = ChunkExtraction(chunk_id="c1", entities=[_entity("Acme", "Organization")])
    answer = ChunkExtraction(
        chunk_id="c1",
        entities=[_entity("Rocket", "Product"), _entity("Volunteered", "Person")],
        relationships=[ExtractedRelationship(source="Acme", source_type="Organization", target="Rocket",
                                             target_type="Product", type="MAKES")],
        llm_calls=1, prompt_tokens=80, completion_tokens=20,
    )
    merged = merge_delta(base, answer, request)
    assert {(e.name, e.type) for e in merged.entities} == {("Acme", "Organization"), ("Rocket", "Product")}
    assert [r.type for r in merged.relationships] == ["MAKES"]
    assert (merged.llm_calls, merged.prompt_tokens, merged.completion_tokens) == (1, 80, 20)
