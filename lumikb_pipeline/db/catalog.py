"""The catalog in the app database: knowledge bases, schema versions and documents with chunks.

These are the operations behind `lumikb kb create`, `lumikb schema set` and `lumikb ingest`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from lumikb_pipeline.core.errors import NotFoundError, UsageError
from lumikb_pipeline.db.models import Chunk, Document, KnowledgeBase, SchemaVersion, utcnow
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.chunking import chunk_text, content_hash, document_title
from lumikb_pipeline.domain.schema import DomainSchema, check_kb_slug, schema_from_json
from lumikb_pipeline.domain.schema_diff import SchemaDiff, check_renames, diff_schemas

# Chunk ids are derived from (document, ordinal), so re-ingesting gives the same ids.
_CHUNK_NAMESPACE = uuid.UUID("6f2d0c1e-6a4b-4c55-9a53-4c1b0f9d7e21")
MAX_FILE_BYTES = 20 * 1024 * 1024


def chunk_id(doc_id: str, ordinal: int) -> str:
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{doc_id}:{ordinal}"))


def get_kb(session: Session, slug: str) -> KnowledgeBase:
    """The KB with this slug, or a NotFoundError that says how to create it."""
    check_kb_slug(slug)
    kb = session.scalar(select(KnowledgeBase).where(KnowledgeBase.slug == slug))
    if kb is None:
        known = ", ".join(session.scalars(select(KnowledgeBase.slug).order_by(KnowledgeBase.slug)).all()[:20])
        hint = f" (known: {known})" if known else ""
        raise NotFoundError(
            f"knowledge base {slug!r} does not exist{hint}; create it with `lumikb kb create {slug} --schema FILE`"
        )
    return kb


def current_schema(session: Session, kb: KnowledgeBase) -> DomainSchema:
    """The KB's current schema version's content."""
    return schema_at(session, kb, kb.current_schema_version)


def schema_at(session: Session, kb: KnowledgeBase, version: int) -> DomainSchema:
    definition = session.scalar(
        select(SchemaVersion.definition).where(SchemaVersion.kb_id == kb.id, SchemaVersion.version == version)
    )
    if definition is None:
        raise NotFoundError(f"KB {kb.slug!r} has no schema version {version}")
    return schema_from_json(definition)


def schema_diff(session: Session, kb: KnowledgeBase, from_version: int, to_version: int) -> SchemaDiff:
    """The diff between two schema versions of `kb` (renames composed over the versions between).

    `from_version` may be above `to_version` only as the same version (an empty diff); versions that
    do not exist are a NotFoundError.
    """
    if from_version > to_version:
        raise UsageError(f"--from {from_version} is after --to {to_version}; give the older version first")
    chain = [schema_at(session, kb, version) for version in range(from_version, to_version + 1)]
    return diff_schemas(chain, from_version, to_version)


def create_kb(session: Session, slug: str, schema: DomainSchema, name: str | None = None) -> KnowledgeBase:
    """Create a KB at schema version 1; a slug that exists already is a UsageError."""
    check_kb_slug(slug)
    if session.scalar(select(KnowledgeBase.id).where(KnowledgeBase.slug == slug)) is not None:
        raise UsageError(
            f"knowledge base {slug!r} exists already; change its schema with `lumikb schema set {slug} FILE`"
        )
    kb = KnowledgeBase(slug=slug, name=name or slug, current_schema_version=1)
    session.add(kb)
    session.flush()
    session.add(
        SchemaVersion(kb_id=kb.id, version=1, definition=schema.to_json(), prompt_version=schema.prompt_version)
    )
    session.flush()
    return kb


def set_schema(session: Session, slug: str, schema: DomainSchema) -> tuple[int, bool]:
    """Add a schema version if `schema` differs from the current one; returns (version, created).

    Its `renamed_from` names are checked against the current version (`schema_diff.check_renames`).
    """
    kb = session.scalar(select(KnowledgeBase).where(KnowledgeBase.slug == check_kb_slug(slug)).with_for_update())
    if kb is None:
        get_kb(session, slug)  # raises with the hint
        raise AssertionError("unreachable")
    current = current_schema(session, kb)
    schema = check_renames(current, schema)
    if current.without_renames() == schema:
        return kb.current_schema_version, False
    version = (session.scalar(select(func.max(SchemaVersion.version)).where(SchemaVersion.kb_id == kb.id)) or 0) + 1
    session.add(
        SchemaVersion(kb_id=kb.id, version=version, definition=schema.to_json(), prompt_version=schema.prompt_version)
    )
    kb.current_schema_version = version
    session.flush()
    return version, True


@dataclass
class IngestReport:
    """What `ingest` did, file by file."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, message)
    document_ids: list[str] = field(default_factory=list)
    partition_keys: list[str] = field(default_factory=list)  # the documents' Dagster partitions, in the same order


def _files(paths: Iterable[Path], report: IngestReport) -> Iterator[Path]:
    for path in paths:
        if not path.exists():
            report.errors.append((str(path), "does not exist; pass existing files or folders"))
        elif path.is_dir():
            root = path.resolve()
            files, outside = [], 0
            for p in _folder_files(path, report):
                # A folder's files stay inside it: a symlink out of it could hand a private file to the LLM.
                if not p.resolve().is_relative_to(root):
                    report.errors.append((str(p), f"is a link to {p.resolve()}, outside {path}; not ingested "
                                                   "(pass that file explicitly if it belongs in the KB)"))
                    outside += 1
                    continue
                files.append(p)
            if not files and not outside:
                report.errors.append((str(path), "folder holds no files to ingest"))
            yield from files
        elif path.is_file():
            yield path
        else:
            report.errors.append((str(path), "is not a regular file or folder"))


def _folder_files(folder: Path, report: IngestReport) -> list[Path]:
    """The regular files under `folder`, sorted, hidden files and folders left out; a folder that
    cannot be read is an error of the report, not a crash (the rest is still ingested)."""

    def unreadable(error: OSError) -> None:
        report.errors.append((str(error.filename or folder), f"cannot be read ({error.strerror}); not ingested"))

    found = []
    for current, folders, names in os.walk(folder, onerror=unreadable):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(current) / name for name in names if not name.startswith(".")]
    return sorted(p for p in found if p.is_file())


def read_document_text(path: Path) -> str:
    """The text of a text or Markdown file; a UsageError says why a file cannot be ingested."""
    size = path.stat().st_size
    if size == 0:
        raise UsageError("is empty; add text to it or leave it out")
    if size > MAX_FILE_BYTES:
        mib = 1024 * 1024
        raise UsageError(f"is {size // mib} MiB, above the {MAX_FILE_BYTES // mib} MiB limit; split it")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise UsageError("is a binary file; ingest only text or Markdown files")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"is not valid UTF-8 (byte {exc.start}); convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if "\x00" in text:  # PostgreSQL text cannot hold NUL; a text file has none
        raise UsageError("is a binary file (it holds NUL bytes); ingest only text or Markdown files")
    if not text.strip():
        raise UsageError("holds only whitespace; add text to it or leave it out")
    return text


MAX_SOURCE_CHARS: int = Document.__table__.c.source.type.length  # type: ignore[attr-defined]  # String(2048)


def check_source(source: str) -> str:
    """A document's source path as it can be stored on every backend, else a UsageError."""
    if len(source) > MAX_SOURCE_CHARS:
        raise UsageError(f"has a path of {len(source)} characters, above the {MAX_SOURCE_CHARS} the catalog "
                         "stores; move it to a shorter path")
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("has a name that is not valid UTF-8; rename it") from None
    return source


def ingest_file(session: Session, kb: KnowledgeBase, path: Path, max_tokens: int) -> tuple[str, str]:
    """Add or update one document from a file; returns (status, document id) with status one of
    added | changed | unchanged."""
    source = str(path.resolve())
    check_source(source)
    text = read_document_text(path)
    digest = content_hash(text)
    document = session.scalar(select(Document).where(Document.kb_id == kb.id, Document.source == source))
    if document is not None and document.content_hash == digest and document.deleted_at is None:
        return "unchanged", document.id
    now = utcnow()
    status = "changed"
    title = document_title(text, path.stem)[:512]
    if document is None:
        status = "added"
        # Its partition key is made from this first title and never changes (`models._assign_partition_key`).
        document = Document(kb_id=kb.id, source=source, title=title, content_hash=digest, revision=0, created_at=now)
        session.add(document)
        session.flush()
    else:
        session.execute(delete(Chunk).where(Chunk.document_id == document.id))
    document.title = title
    document.content_hash = digest
    document.revision += 1
    document.updated_at = now
    document.deleted_at = None
    session.add_all(
        Chunk(
            id=chunk_id(document.id, chunk.ordinal), document_id=document.id, ordinal=chunk.ordinal,
            text=chunk.text, token_count=chunk.token_count, content_hash=chunk.content_hash,
        )
        for chunk in chunk_text(text, max_tokens)
    )
    session.flush()
    return status, document.id


def ingest(database_url: str, slug: str, paths: Iterable[Path], max_tokens: int = 400) -> IngestReport:
    """Ingest files and folders into a KB, each file in its own transaction, so one bad file never
    stops the others. An unknown KB raises NotFoundError before anything is read."""
    report = IngestReport()
    with session_scope(database_url) as session:
        kb_id = get_kb(session, slug).id
    for path in _files(paths, report):
        try:
            with session_scope(database_url) as session:
                kb = session.get_one(KnowledgeBase, kb_id)
                status, doc_id = ingest_file(session, kb, path, max_tokens)
                key = session.get_one(Document, doc_id).partition_key
        except UsageError as exc:
            report.errors.append((str(path), str(exc)))
            continue
        except OSError as exc:
            report.errors.append((str(path), f"cannot be read ({exc.strerror or exc})"))
            continue
        getattr(report, status).append(str(path))
        report.document_ids.append(doc_id)
        report.partition_keys.append(key)
    return report


def delete_document(session: Session, doc_id: str) -> None:
    """Soft-delete a document; the partitions sensor then removes its graph contribution."""
    document = session.get(Document, doc_id)
    if document is None:
        raise NotFoundError(f"document {doc_id} does not exist")
    if document.deleted_at is None:
        document.deleted_at = utcnow()
        document.updated_at = document.deleted_at
