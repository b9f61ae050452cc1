"""Fuzz: every CLI argument that takes user text, in-process (typer's CliRunner) on the embedded
defaults. Bad input is exit code 2 with a message, never a traceback or exit 1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from lumikb_pipeline.cli import app
from lumikb_pipeline_tests.fuzz.strategies import CYPHER_LIKE

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]  # the slow step: the fast one stays under 5 minutes

runner = CliRunner()
SCHEMA = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo" / "schema_v1.yaml"
# argv holds what the OS gives: any text, with lone surrogates for bytes that are not UTF-8.
arg_text = st.one_of(
    st.text(st.characters(codec=None, exclude_characters="\x00"), max_size=30),
    st.sampled_from([c for c in CYPHER_LIKE if "\x00" not in c] + ["demo", "k", "-", "--", "--help", "0", "nan"]),
    st.text(st.sampled_from("abc-[]/:%@_0"), min_size=1, max_size=12),
)
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def _invoke(args: list[str]) -> Result:
    result = runner.invoke(app, args)
    output = result.output
    assert "Traceback" not in output, output
    assert result.exit_code in (0, 2), (args, result.exit_code, output, result.exception)
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
    return result


@pytest.fixture
def kb(lumikb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative paths given to commands stay in a folder of the test's
    assert runner.invoke(app, ["kb", "create", "k", "--schema", str(SCHEMA)]).exit_code == 0
    doc = tmp_path / "a.md"
    doc.write_text("Acme Corp hired Jane Doe in Berlin.")
    assert runner.invoke(app, ["ingest", "k", str(doc)]).exit_code == 0
    return "k"


COMMANDS: dict[str, Callable[[str], list[str]]] = {
    "kb create": lambda t: ["kb", "create", t, "--schema", str(SCHEMA)],
    "kb create --name": lambda t: ["kb", "create", "named", "--schema", str(SCHEMA), "--name", t],
    "kb create --schema": lambda t: ["kb", "create", "x", "--schema", t],
    "schema set": lambda t: ["schema", "set", t, str(SCHEMA)],
    "schema set FILE": lambda t: ["schema", "set", "k", t],
    "schema show": lambda t: ["schema", "show", t],
    "schema show --version": lambda t: ["schema", "show", "k", "--version", t],
    "ingest": lambda t: ["ingest", t, "nothing-here"],
    # Relative to the test's folder (the fixture's working directory): "/" would walk the machine.
    "ingest PATH": lambda t: ["ingest", "k", t.lstrip("/") or "."],
    "reextract": lambda t: ["reextract", t, "--dry-run"],
    "reextract --doc": lambda t: ["reextract", "k", "--doc", t, "--dry-run"],
    "reextract --max-cost": lambda t: ["reextract", "k", "--max-cost", t, "--dry-run"],
    "reextract --mode": lambda t: ["reextract", "k", "--mode", t, "--dry-run"],
    "reextract --idle-timeout": lambda t: ["reextract", "k", "--idle-timeout", t, "--dry-run"],
    "progress": lambda t: ["progress", t],
    "progress --json": lambda t: ["progress", t, "--json"],
    "progress --interval": lambda t: ["progress", "x", "--interval", t],
    "cancel": lambda t: ["cancel", t],
    "drift": lambda t: ["drift", t],
    "schedule set-cron": lambda t: ["schedule", "set-cron", t],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_text_argument_gives_success_or_a_clear_usage_error(kb: str, command: str) -> None:
    build = COMMANDS[command]

    @FUZZ
    @given(text=arg_text)
    def run(text: str) -> None:
        _invoke(build(text))

    run()
