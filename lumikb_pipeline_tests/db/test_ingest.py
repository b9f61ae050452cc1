"""`lumikb kb create`, `schema set` and `ingest` through the real CLI, on the embedded default."""

from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.db.models import Chunk, Document, KnowledgeBase, SchemaVersion
from lumikb_pipeline.db.session import session_scope

SCHEMA = """\
entity_types:
  - name: Organization
  - name: Person
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
"""

runner = CliRunner()


def lumikb(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def kb(lumikb_env: Path, tmp_path: Path) -> str:
    schema = tmp_path / "schema.yaml"
    schema.write_text(SCHEMA)
    code, output = lumikb("kb", "create", "acme", "--schema", str(schema))
    assert code == 0, output
    return "acme"


def write_corpus(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        body = "\n\n".join(f"Paragraph {p} of document {i}: Acme Corp employs Jane Doe {i}." for p in range(3))
        (folder / f"doc-{i:03d}.md").write_text(f"# Document {i}\n\n{body}\n")


def counts() -> tuple[int, int]:
    with session_scope(load_settings().effective_database_url) as session:
        documents = session.scalar(select(func.count()).select_from(Document))
        chunks = session.scalar(select(func.count()).select_from(Chunk))
    return documents or 0, chunks or 0


def test_ingesting_a_folder_of_100_files_gives_100_documents_with_chunks(kb: str, tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", 100)
    code, output = lumikb("ingest", kb, str(tmp_path / "corpus"))
    assert code == 0, output
    assert "100 added" in output
    documents, chunks = counts()
    assert documents == 100 and chunks >= 100
    with session_scope(load_settings().effective_database_url) as session:
        assert session.scalar(select(func.min(Chunk.token_count))) > 0  # type: ignore[operator]
        titles = set(session.scalars(select(Document.title)))
    assert "Document 7" in titles


def test_reingesting_unchanged_files_adds_nothing(kb: str, tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", 20)
    lumikb("ingest", kb, str(tmp_path / "corpus"))
    before = counts()
    code, output = lumikb("ingest", kb, str(tmp_path / "corpus"))
    assert code == 0 and "0 added, 0 changed, 20 unchanged" in output
    assert counts() == before


def test_a_changed_file_marks_its_document_changed(kb: str, tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", 3)
    lumikb("ingest", kb, str(tmp_path / "corpus"))
    with session_scope(load_settings().effective_database_url) as session:
        before = {d.source: (d.revision, d.content_hash) for d in session.scalars(select(Document))}
    changed = tmp_path / "corpus" / "doc-001.md"
    changed.write_text(changed.read_text() + "\n\nGlobex hires John Roe.\n")
    code, output = lumikb("ingest", kb, str(tmp_path / "corpus"))
    assert code == 0 and "1 changed, 2 unchanged" in output
    with session_scope(load_settings().effective_database_url) as session:
        after = {d.source: (d.revision, d.content_hash) for d in session.scalars(select(Document))}
        text = " ".join(session.scalars(select(Chunk.text).join(Document).where(Document.source == str(changed))))
    assert after[str(changed)][0] == before[str(changed)][0] + 1
    assert after[str(changed)][1] != before[str(changed)][1]
    assert "Globex" in text
    assert {k: v for k, v in after.items() if k != str(changed)} == {
        k: v for k, v in before.items() if k != str(changed)
    }


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.md", b"", "is empty"),
        ("binary.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
        ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "not valid UTF-8"),
    ],
)
def test_a_bad_file_gets_exit_2_naming_it_and_the_others_are_still_ingested(
    kb: str, tmp_path: Path, name: str, content: bytes, fragment: str
) -> None:
    write_corpus(tmp_path / "corpus", 3)
    (tmp_path / "corpus" / name).write_bytes(content)
    code, output = lumikb("ingest", kb, str(tmp_path / "corpus"))
    assert code == 2
    assert name in output and fragment in output
    assert counts()[0] == 3


def test_a_missing_path_gets_exit_2_and_the_other_paths_are_ingested(kb: str, tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", 2)
    code, output = lumikb("ingest", kb, str(tmp_path / "missing.md"), str(tmp_path / "corpus"))
    assert code == 2 and "missing.md" in output and "does not exist" in output
    assert counts()[0] == 2


def test_an_unknown_kb_gets_exit_2_with_how_to_create_it(kb: str, tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", 1)
    code, output = lumikb("ingest", "nope", str(tmp_path / "corpus"))
    assert code == 2 and "'nope' does not exist" in output and "lumikb kb create nope" in output


def test_a_bad_slug_gets_exit_2_with_the_rule(lumikb_env: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.yaml"
    schema.write_text(SCHEMA)
    code, output = lumikb("kb", "create", "Bad_Slug", "--schema", str(schema))
    assert code == 2 and "lowercase" in output


def test_schema_set_adds_a_version_only_when_the_schema_changes(kb: str, tmp_path: Path) -> None:
    same = tmp_path / "same.yaml"
    same.write_text(SCHEMA)
    code, output = lumikb("schema", "set", kb, str(same))
    assert code == 0 and "stays at schema version 1" in output
    changed = tmp_path / "changed.yaml"
    changed.write_text(SCHEMA + "  - name: KNOWS\n    source: [Person]\n    target: [Person]\n")
    code, output = lumikb("schema", "set", kb, str(changed))
    assert code == 0 and "now at schema version 2" in output
    with session_scope(load_settings().effective_database_url) as session:
        assert session.scalar(select(KnowledgeBase.current_schema_version)) == 2
        assert session.scalar(select(func.count()).select_from(SchemaVersion)) == 2  # old versions are kept


def test_a_bad_schema_file_gets_exit_2_pointing_at_the_line(kb: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("entity_types:\n  - name: Person\nrelationship_types:\n  - name: KNOWS\n    source: [Person]\n"
                   "    target: [Robot]\n")
    code, output = lumikb("schema", "set", kb, str(bad))
    assert code == 2 and "line 4" in output and "Robot" in output
