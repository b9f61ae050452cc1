"""`lumikb db upgrade`, `lumikb kb …`, `lumikb schema …` and `lumikb ingest`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import func, select

from lumikb_pipeline.cli.app import app, console, db_app, echo, handle_errors, kb_app, print_error, schema_app
from lumikb_pipeline.core.config import Settings, load_settings
from lumikb_pipeline.core.errors import UsageError
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db import catalog, migrate
from lumikb_pipeline.db.models import Document, KnowledgeBase
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_file


def ready_settings() -> Settings:
    """Settings from the environment, with the app database usable (SQLite migrated on demand)."""
    settings = load_settings()
    migrate.ensure_database(settings.effective_database_url)
    return settings


@db_app.command("upgrade")
@handle_errors
def db_upgrade() -> None:
    """Apply the app database's migrations (idempotent)."""
    settings = load_settings()
    migrate.upgrade(settings.effective_database_url)
    console.print(
        f"app database {scrub(settings.effective_database_url)} is at revision {migrate.head_revision()}",
        highlight=False,
    )


@kb_app.command("create")
@handle_errors
def kb_create(
    slug: Annotated[str, typer.Argument(help="The KB's slug: lowercase letters, digits and '-'.")],
    schema: Annotated[Path, typer.Option("--schema", help="Schema file (YAML or JSON).")],
    name: Annotated[str | None, typer.Option(help="A display name (default: the slug).")] = None,
) -> None:
    """Create a knowledge base with its first schema version."""
    domain_schema = parse_schema_file(schema)
    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        catalog.create_kb(session, slug, domain_schema, name)
    console.print(f"created KB {slug} at schema version 1", highlight=False)


@kb_app.command("list")
@handle_errors
def kb_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List knowledge bases with their schema version and document count."""
    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        rows = session.execute(
            select(KnowledgeBase.slug, KnowledgeBase.current_schema_version, func.count(Document.id))
            .outerjoin(Document, (Document.kb_id == KnowledgeBase.id) & Document.deleted_at.is_(None))
            .group_by(KnowledgeBase.id)
            .order_by(KnowledgeBase.slug)
        ).tuples().all()
    items = [{"kb": slug, "schema_version": version, "documents": count} for slug, version, count in rows]
    if as_json:
        echo(json.dumps(items))
        return
    for item in items:
        console.print(f"{item['kb']}\tschema v{item['schema_version']}\t{item['documents']} documents", highlight=False)


@schema_app.command("set")
@handle_errors
def schema_set(
    slug: Annotated[str, typer.Argument(help="The KB's slug.")],
    schema_file: Annotated[Path, typer.Argument(help="Schema file (YAML or JSON).", metavar="FILE")],
) -> None:
    """Add a schema version to a KB (nothing happens if the file equals the current version)."""
    domain_schema = parse_schema_file(schema_file)
    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        version, created = catalog.set_schema(session, slug, domain_schema)
    if created:
        console.print(f"KB {slug} is now at schema version {version}", highlight=False)
    else:
        console.print(f"KB {slug} stays at schema version {version}: the file equals it", highlight=False)


@schema_app.command("show")
@handle_errors
def schema_show(
    slug: Annotated[str, typer.Argument(help="The KB's slug.")],
    version: Annotated[int | None, typer.Option(help="A version (default: the current one).")] = None,
) -> None:
    """Print a schema version as JSON."""
    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        kb = catalog.get_kb(session, slug)
        schema = catalog.schema_at(session, kb, version or kb.current_schema_version)
    echo(json.dumps(schema.to_json(), indent=2))


@schema_app.command("diff")
@handle_errors
def schema_diff(
    slug: Annotated[str, typer.Argument(help="The KB's slug.")],
    from_version: Annotated[
        int | None, typer.Option("--from", help="The older version (default: the one before --to).")
    ] = None,
    to_version: Annotated[
        int | None, typer.Option("--to", help="The newer version (default: the current one).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What changed between two schema versions, and the re-extraction strategy it implies."""
    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        kb = catalog.get_kb(session, slug)
        to_v = to_version or kb.current_schema_version
        from_v = from_version if from_version is not None else max(1, to_v - 1)
        diff = catalog.schema_diff(session, kb, from_v, to_v)
    if as_json:
        typer.echo(json.dumps(diff.to_json(slug), indent=2))
        return
    console.print(f"KB {slug}: schema version {from_v} -> {to_v}", highlight=False)
    for kind, changes in (("entity types", diff.entity_types), ("relationship types", diff.relationship_types)):
        lines = [f"  added: {', '.join(changes.added)}" if changes.added else "",
                 f"  removed: {', '.join(changes.removed)}" if changes.removed else "",
                 "  renamed: " + ", ".join(f"{old} -> {new}" for old, new in changes.renamed.items())
                 if changes.renamed else "",
                 f"  changed: {', '.join(changes.changed)}" if changes.changed else ""]
        lines = [line for line in lines if line]
        console.print(f"{kind}:" + ("" if lines else " unchanged"), highlight=False)
        for line in lines:
            console.print(line, highlight=False, markup=False)
    console.print(f"prompt changed: {'yes' if diff.prompt_changed else 'no'}", highlight=False)
    why = f" ({'; '.join(diff.full_reasons)})" if diff.full_reasons else ""
    console.print(f"strategy: {diff.strategy}{why}", highlight=False, markup=False)


@app.command("ingest")
@handle_errors
def ingest(
    slug: Annotated[str, typer.Argument(help="The KB's slug.")],
    paths: Annotated[list[Path], typer.Argument(help="Text or Markdown files, or folders of them.", metavar="PATH…")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Add or update documents from files or folders, chunked. Unchanged files change nothing; a
    file that cannot be ingested is reported (exit code 2) and the others are still ingested."""
    settings = ready_settings()
    report = catalog.ingest(settings.effective_database_url, slug, paths, settings.chunk_tokens)
    if as_json:
        echo(json.dumps({
            "kb": slug, "added": len(report.added), "changed": len(report.changed),
            "unchanged": len(report.unchanged), "document_ids": report.document_ids,
            "partition_keys": report.partition_keys,
            "errors": [{"path": path, "error": message} for path, message in report.errors],
        }))
    else:
        console.print(
            f"KB {slug}: {len(report.added)} added, {len(report.changed)} changed, "
            f"{len(report.unchanged)} unchanged, {len(report.errors)} not ingested",
            highlight=False,
        )
    for path, message in report.errors:
        print_error(f"{path}: {message}")
    if report.errors:
        raise typer.Exit(UsageError.exit_code)
