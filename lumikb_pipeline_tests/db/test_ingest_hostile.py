"""Ingest stays inside the folders it is given and refuses what no backend can store (issue 15)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline.db import catalog
from lumikb_pipeline.db.models import Document
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_text

runner = CliRunner()
SCHEMA = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo" / "schema_v1.yaml"


def _kb(url: str, slug: str = "docs") -> None:
    with session_scope(url) as session:
        catalog.create_kb(session, slug, parse_schema_text("entity_types: [{name: Person}]"))


def _sources(url: str) -> list[str]:
    with session_scope(url) as session:
        return sorted(session.scalars(select(Document.source)))


def test_a_symlink_out_of_the_folder_is_reported_and_not_ingested(lumikb_env: Path, tmp_path: Path) -> None:
    private = tmp_path / "private.txt"
    private.write_text("My bank PIN is 1234.")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("Acme Corp hired Jane Doe.")
    (folder / "x.txt").symlink_to(private)
    (folder / "inside.md").symlink_to(folder / "a.md")  # a link that stays inside is fine
    assert runner.invoke(app, ["kb", "create", "docs", "--schema", str(SCHEMA)]).exit_code == 0
    result = runner.invoke(app, ["ingest", "docs", str(folder), "--json"])
    assert result.exit_code == 2, result.output
    assert "outside" in result.output and "x.txt" in result.output
    from lumikb_pipeline.core.config import load_settings

    sources = _sources(load_settings().effective_database_url)
    assert str(private.resolve()) not in sources
    assert sources == [str((folder / "a.md").resolve())]


def test_a_source_path_longer_than_the_column_is_refused_per_file_on_every_backend(db_url: str,
                                                                                   tmp_path: Path) -> None:
    _kb(db_url)
    folder = tmp_path / "docs"
    deep = folder
    while len(str(deep.resolve())) <= catalog.MAX_SOURCE_CHARS + 10:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    (deep / "long.md").write_text("Jane Doe works at Acme.")
    (folder / "short.md").write_text("John Roe works at Initech.")
    report = catalog.ingest(db_url, "docs", [folder])
    assert [path for path, _ in report.errors] == [str(deep / "long.md")]
    assert "characters" in report.errors[0][1] and "shorter path" in report.errors[0][1]
    assert _sources(db_url) == [str((folder / "short.md").resolve())]


def test_a_nul_byte_after_the_first_block_is_refused_on_every_backend(db_url: str, tmp_path: Path) -> None:
    _kb(db_url)
    bad = tmp_path / "late-nul.md"
    bad.write_bytes(b"x" * 10_000 + b"\x00tail")
    good = tmp_path / "good.md"
    good.write_text("Jane Doe works at Acme.")
    report = catalog.ingest(db_url, "docs", [bad, good])
    assert [path for path, _ in report.errors] == [str(bad)]
    assert "binary" in report.errors[0][1]
    assert len(report.added) == 1


def test_a_file_name_that_is_not_utf8_is_refused_on_every_backend(db_url: str, tmp_path: Path) -> None:
    _kb(db_url)
    folder = tmp_path / "docs"
    folder.mkdir()
    os.close(os.open(os.fsencode(folder) + b"/caf\xe9.md", os.O_CREAT | os.O_WRONLY, 0o600))
    with open(os.fsencode(folder) + b"/caf\xe9.md", "w") as handle:  # noqa: PTH123
        handle.write("Jane Doe works at Acme.")
    (folder / "ok.md").write_text("John Roe works at Initech.")
    report = catalog.ingest(db_url, "docs", [folder])
    assert len(report.errors) == 1 and "not valid UTF-8" in report.errors[0][1]
    assert len(report.added) == 1
