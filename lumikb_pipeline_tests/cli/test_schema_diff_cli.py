"""`lumikb schema set` with renamed_from and `lumikb schema diff`, through the real CLI (embedded default)."""

import json
from pathlib import Path

from typer.testing import CliRunner

from lumikb_pipeline.cli import app

V1 = """\
entity_types:
  - {name: Organization, description: A company.}
  - {name: Person, description: A human.}
  - {name: Place, description: A city.}
relationship_types:
  - {name: EMPLOYS, source: [Organization], target: [Person], description: Employs.}
  - {name: LOCATED_IN, source: [Organization], target: [Place], description: Is in.}
"""
V2 = """\
entity_types:
  - {name: Company, renamed_from: Organization, description: A company.}
  - {name: Person, description: A human.}
relationship_types:
  - {name: EMPLOYS, source: [Company], target: [Person], description: Employs.}
"""
V3 = V2 + "  - {name: KNOWS, source: [Person], target: [Person], description: Knows.}\n"

runner = CliRunner()


def lumikb(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_schema_diff_shows_renames_removals_additions_and_strategy(lumikb_env: Path, tmp_path: Path) -> None:
    assert lumikb("kb", "create", "acme", "--schema", write(tmp_path, "v1.yaml", V1))[0] == 0
    assert lumikb("schema", "set", "acme", write(tmp_path, "v2.yaml", V2))[0] == 0
    code, output = lumikb("schema", "diff", "acme", "--json")
    assert code == 0, output
    assert json.loads(output) == {
        "kb": "acme", "from": 1, "to": 2,
        "entity_types": {"added": [], "removed": ["Place"], "renamed": {"Organization": "Company"}, "changed": []},
        "relationship_types": {"added": [], "removed": ["LOCATED_IN"], "renamed": {}, "changed": []},
        "prompt_changed": False, "strategy": "graph-only",
    }
    # The file kept with its renamed_from is the same schema: no new version.
    code, output = lumikb("schema", "set", "acme", write(tmp_path, "v2b.yaml", V2))
    assert code == 0 and "stays at schema version 2" in output
    assert lumikb("schema", "set", "acme", write(tmp_path, "v3.yaml", V3))[0] == 0
    code, output = lumikb("schema", "diff", "acme", "--from", "1", "--to", "3", "--json")
    diff = json.loads(output)
    assert diff["relationship_types"]["added"] == ["KNOWS"]
    assert diff["entity_types"]["renamed"] == {"Organization": "Company"}
    assert diff["strategy"] == "delta"
    code, output = lumikb("schema", "diff", "acme")
    assert code == 0 and "strategy: delta" in output and "added: KNOWS" in output


def test_schema_set_refuses_an_unknown_old_name(lumikb_env: Path, tmp_path: Path) -> None:
    assert lumikb("kb", "create", "acme", "--schema", write(tmp_path, "v1.yaml", V1))[0] == 0
    code, output = lumikb("schema", "set", "acme", write(tmp_path, "bad.yaml", V2.replace(
        "renamed_from: Organization", "renamed_from: Organisation")))
    assert code == 2
    assert "renamed_from 'Organisation'" in output and "Organization" in output


def test_schema_diff_of_unknown_version_is_a_usage_error(lumikb_env: Path, tmp_path: Path) -> None:
    assert lumikb("kb", "create", "acme", "--schema", write(tmp_path, "v1.yaml", V1))[0] == 0
    code, output = lumikb("schema", "diff", "acme", "--from", "1", "--to", "5")
    assert code == 2 and "no schema version" in output
