from pathlib import Path

import pytest

from lumikb_pipeline.core.errors import SchemaFileError
from lumikb_pipeline.domain.schema import parse_schema_file, parse_schema_text

VALID = """\
entity_types:
  - name: Organization
    description: A company, agency or institution.
  - name: Person
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
    description: The organisation employs the person.
prompt_version: 2
"""


def test_valid_schema_file_is_parsed_into_types() -> None:
    schema = parse_schema_text(VALID)
    assert schema.entity_type_names == {"Organization", "Person"}
    assert schema.allows_relationship("EMPLOYS", "Organization", "Person")
    assert not schema.allows_relationship("EMPLOYS", "Person", "Organization")
    assert schema.prompt_version == 2


def test_json_schema_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text('{"entity_types": [{"name": "Person", "description": "A human."}], "relationship_types": []}')
    assert parse_schema_file(path).entity_type_names == {"Person"}


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("entity_types:\n  - name: person\n", 2, "must match"),
        ("entity_types:\n  - name: Person\n  - name: Person\n", 3, "defined twice"),
        (
            "entity_types:\n  - name: Person\nrelationship_types:\n  - name: KNOWS\n    source: [Person]\n"
            "    target: [Robot]\n",
            4,
            "unknown entity type 'Robot'",
        ),
        (
            "entity_types:\n  - name: Person\nrelationship_types:\n  - name: knows\n    source: [Person]\n"
            "    target: [Person]\n",
            4,
            "must match",
        ),
        ("entity_types:\n  - name: Person\n    description: [1, 2\n", 3, "not valid YAML"),
    ],
)
def test_bad_schema_file_is_refused_with_its_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(SchemaFileError) as raised:
        parse_schema_text(text, where="s.yaml")
    assert f"s.yaml, line {line}" in str(raised.value)
    assert fragment in str(raised.value)


def test_unknown_key_and_missing_entity_types_are_refused() -> None:
    with pytest.raises(SchemaFileError, match="unknown key"):
        parse_schema_text("entity_types:\n  - name: Person\nextra: 1\n")
    with pytest.raises(SchemaFileError, match="'entity_types' must be a non-empty list"):
        parse_schema_text("relationship_types: []\n")


def test_missing_schema_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SchemaFileError, match="does not exist"):
        parse_schema_file(tmp_path / "nope.yaml")
