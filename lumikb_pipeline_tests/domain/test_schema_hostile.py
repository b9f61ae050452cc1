"""Schema files and settings that used to be accepted, hang or crash (issue 15)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline.core.errors import SchemaFileError
from lumikb_pipeline.domain.schema import parse_schema_file, parse_schema_text

runner = CliRunner()


@pytest.mark.parametrize("reserved", ["MENTIONS", "HAS_CHUNK"])
def test_a_relationship_type_named_like_the_graph_models_own_is_refused_with_its_line(reserved: str) -> None:
    text = f"""entity_types:
  - name: Person
relationship_types:
  - name: KNOWS
    source: [Person]
    target: [Person]
  - name: {reserved}
    source: [Person]
    target: [Person]
"""
    with pytest.raises(SchemaFileError) as error:
        parse_schema_text(text, "s.yaml")
    assert "s.yaml, line 7" in str(error.value) and "reserved" in str(error.value)


def test_a_duplicate_yaml_key_is_refused_with_its_line() -> None:
    text = "entity_types:\n  - name: Person\n    description: one\n    description: two\n"
    with pytest.raises(SchemaFileError) as error:
        parse_schema_text(text, "s.yaml")
    assert "s.yaml, line 4" in str(error.value) and "'description' appears twice" in str(error.value)
    with pytest.raises(SchemaFileError, match="line 3"):
        parse_schema_text("entity_types: [{name: A}]\nprompt_version: 1\nentity_types: [{name: B}]\n", "s.yaml")


def test_a_fifo_as_schema_path_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "schema.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def parse() -> None:
        try:
            parse_schema_file(fifo)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader so the thread ends, then fail
        with open(fifo, "w"):  # noqa: PTH123
            pass
        pytest.fail("parsing a FIFO blocked")
    assert isinstance(outcome[0], SchemaFileError) and "not a regular file" in str(outcome[0])


def test_a_device_or_folder_as_schema_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaFileError, match="not a regular file"):
        parse_schema_file(Path("/dev/zero"))
    with pytest.raises(SchemaFileError, match="folder"):
        parse_schema_file(tmp_path)


def test_a_schema_of_20000_entity_types_validates_in_linear_time() -> None:
    def schema(n: int) -> str:
        return "entity_types:\n" + "".join(f"  - name: T{i}\n    description: d\n" for i in range(n)) + \
            "relationship_types:\n" + "".join(
                f"  - {{name: R{i}, source: [T{i}], target: [T{i + 1}]}}\n" for i in range(n - 1))

    small, large = schema(2_000), schema(20_000)
    started = time.perf_counter()
    parse_schema_text(small)
    small_s = time.perf_counter() - started
    started = time.perf_counter()
    parsed = parse_schema_text(large)
    large_s = time.perf_counter() - started
    assert len(parsed.entity_types) == 20_000
    # Ten times the types: a linear check takes ~10x; the old quadratic one took ~100x (34 s).
    assert large_s < max(30 * small_s, 1.0), (small_s, large_s)
    assert large_s < 15


def test_lumikb_home_pointing_at_a_file_is_a_clear_error_naming_the_variable(lumikb_env: Path,
                                                                             tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    monkeypatch.setenv("LUMIKB_HOME", str(a_file))
    result = runner.invoke(app, ["kb", "list"])
    assert result.exit_code == 2, result.output
    assert "LUMIKB_HOME" in result.output and "not a folder" in result.output
    assert "Traceback" not in result.output
