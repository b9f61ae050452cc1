"""What a user or the model wrote is printed as text, never read as Rich markup (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline.cli.progress import render_progress
from lumikb_pipeline.tracking.progress import JobProgress

runner = CliRunner()
SCHEMA = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo" / "schema_v1.yaml"
HOSTILE = ["a[/]b", "[draft]", "[link=https://evil.example]click[/link]", "[bold red]x", "[/"]


@pytest.mark.parametrize("slug", HOSTILE)
def test_a_kb_slug_with_markup_is_refused_and_shown_as_written(lumikb_env: Path, slug: str) -> None:
    result = runner.invoke(app, ["kb", "create", slug, "--schema", str(SCHEMA)])
    assert result.exit_code == 2, result.output
    assert slug in result.output
    assert "MarkupError" not in result.output


@pytest.mark.parametrize("job_id", HOSTILE)
@pytest.mark.parametrize("command", ["progress", "cancel"])
def test_a_job_id_with_markup_is_shown_as_written(lumikb_env: Path, command: str, job_id: str) -> None:
    result = runner.invoke(app, [command, job_id])
    assert result.exit_code == 2, result.output
    assert job_id in result.output


def test_ingest_shows_file_names_with_brackets_as_written_and_reports_every_error(lumikb_env: Path,
                                                                                   tmp_path: Path) -> None:
    assert runner.invoke(app, ["kb", "create", "docs", "--schema", str(SCHEMA)]).exit_code == 0
    folder = tmp_path / "in"
    folder.mkdir()
    # A '/' in a path is a folder: "[/]" is the folder "[" and a file "]...".
    names = ["[/]broken.md", "report [draft].md", "[link=file:x]click[/link].md", "zz-empty.md"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")  # empty: each is reported with its name
    (folder / "ok [fine].md").write_text("Acme Corp hired Jane Doe in Berlin.")
    result = runner.invoke(app, ["ingest", "docs", str(folder)])
    assert result.exit_code == 2, result.output
    assert "1 added" in result.output
    for name in names:
        assert name in result.output
    assert "report .md" not in result.output


def test_progress_shows_a_model_answer_with_markup_as_written() -> None:
    progress = JobProgress(
        job_id="[/]job", status="[draft]", total=2, completed=0, failed=1, cancelled=0, remaining=1, rate_per_s=0.0,
        eta_seconds=None, started_at=None, updated_at=None,
        recent_errors=[{"at": "2026-01-01T00:00:00", "doc_id": "[link=x]d", "error": "model said [/] and [b]x[/b]"}],
    )
    console = Console(record=True, width=200)
    console.print(render_progress(progress))
    text = console.export_text()
    assert "model said [/] and [b]x[/b]" in text and "job [/]job [[draft]]" in text
