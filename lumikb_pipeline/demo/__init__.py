"""`lumikb demo`: the whole product in one command, on the embedded defaults.

It loads the bundled sample corpus (36 short documents the project wrote) into the KB `demo`,
extracts it, evolves the schema by adding types, re-extracts the outdated documents as a job — all
through the same Dagster job code as production, run in this process — shows the job's live
progress and what it paid beside what a full re-extraction would have (the job asks the LLM only for
the added types: strategy `delta`), then removes one type and renames another, which the next job
migrates in the graph without one LLM call (`graph-only`), proves that a re-run is served from the
chunk checkpoints, and prints a summary.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db import catalog, migrate
from lumikb_pipeline.db.models import Document, ExtractionRecord, ExtractionStatus, Job, KnowledgeBase
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_file
from lumikb_pipeline.graph import open_graph_store
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.reextraction.drift import drift_report
from lumikb_pipeline.tracking.progress import job_progress

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from lumikb_pipeline.orchestration.in_process import InProcessRun
from lumikb_pipeline.reextraction.estimate import ReextractionEstimate, estimate_reextraction

DEMO_DIR = Path(__file__).resolve().parent
CORPUS = DEMO_DIR / "corpus"
SCHEMA_V1 = DEMO_DIR / "schema_v1.yaml"
SCHEMA_V2 = DEMO_DIR / "schema_v2.yaml"
SCHEMA_V3 = DEMO_DIR / "schema_v3.yaml"
# The offline model is free; the demo shows what the tokens would cost at a common paid model's prices.
PRICE_MODEL = "gpt-4o-mini"
KB = "demo"


@dataclass
class DemoSummary:
    documents: int
    entities: int
    relationships: int
    llm_calls: int
    checkpoints_reused: int
    seconds: float
    job_id: str


def _reset(settings: Settings, console: Console) -> None:
    """Remove a previous demo's KB, its graph and its partitions, so the demo can run again."""
    with session_scope(settings.effective_database_url) as session:
        kb = session.scalar(select(KnowledgeBase).where(KnowledgeBase.slug == KB))
        if kb is None:
            return
        documents = session.execute(select(Document.id, Document.partition_key).where(Document.kb_id == kb.id)).all()
    doc_ids = [doc_id for doc_id, _key in documents]
    store = open_graph_store(settings)
    try:
        for doc_id in doc_ids:
            store.remove_document(KB, doc_id)
    finally:
        store.close()
    from lumikb_pipeline.core.names import DOCUMENTS_PARTITIONS
    from lumikb_pipeline.infra.dagster_instance import open_instance

    instance = open_instance(settings)
    for _doc_id, key in documents:
        instance.delete_dynamic_partition(DOCUMENTS_PARTITIONS, key)
    with session_scope(settings.effective_database_url) as session:
        session.delete(session.scalars(select(KnowledgeBase).where(KnowledgeBase.slug == KB)).one())
    console.print(f"removed the previous demo: KB {KB!r} with {len(doc_ids)} documents")


def _ledger_usage(settings: Settings, kb_id: int, schema_version: int) -> tuple[int, int, int]:
    """LLM calls, prompt and completion tokens of the extractions at a version."""
    with session_scope(settings.effective_database_url) as session:
        calls, prompt, completion = session.execute(
            select(func.coalesce(func.sum(ExtractionRecord.llm_calls), 0),
                   func.coalesce(func.sum(ExtractionRecord.prompt_tokens), 0),
                   func.coalesce(func.sum(ExtractionRecord.completion_tokens), 0))
            .where(ExtractionRecord.kb_id == kb_id, ExtractionRecord.schema_version == schema_version)
        ).one()
    return int(calls), int(prompt), int(completion)


def _priced(prompt_tokens: int, completion_tokens: int) -> str:
    from lumikb_pipeline.llm.cost import estimate_cost, is_priced

    if not is_priced(PRICE_MODEL):
        return f"{prompt_tokens} + {completion_tokens} tokens"
    cost = estimate_cost(PRICE_MODEL, prompt_tokens, completion_tokens)
    return f"{prompt_tokens} + {completion_tokens} tokens (${cost:.4f} at {PRICE_MODEL} prices)"


def _ledger_totals(settings: Settings, kb_id: int, schema_version: int) -> tuple[int, int]:
    """LLM calls and checkpoint hits of the latest extraction of each document at a version."""
    with session_scope(settings.effective_database_url) as session:
        calls, cached = session.execute(
            select(func.coalesce(func.sum(ExtractionRecord.llm_calls), 0),
                   func.coalesce(func.sum(ExtractionRecord.cached_chunks), 0))
            .where(ExtractionRecord.kb_id == kb_id, ExtractionRecord.schema_version == schema_version)
        ).one()
    return int(calls), int(cached)


def _run_job_as_backfill(
    settings: Settings, instance: DagsterInstance, job: Job, doc_ids: list[str], *, batch_size: int | None = None,
    on_batch: Callable[[InProcessRun], None] | None = None,
) -> list[InProcessRun]:
    """A re-extraction job's runs, here in this process, as the backfill of `document_entities` the
    job would launch: the runs carry its tags and the Backfills page lists it once they have run."""
    from lumikb_pipeline.definitions import defs
    from lumikb_pipeline.orchestration.in_process import run_documents_in_process
    from lumikb_pipeline.reextraction.service import (
        backfill_id_for,
        in_process_backfill_tags,
        record_in_process_backfill,
    )

    started = time.time()
    runs = run_documents_in_process(
        settings, doc_ids, instance=instance, job_id=job.id, schema_version=job.target_schema_version,
        batch_size=batch_size, on_batch=on_batch, backfill_id=backfill_id_for(job.id),
        tags=in_process_backfill_tags(job, KB),
    )
    with session_scope(settings.effective_database_url) as session:
        succeeded = list(session.scalars(
            select(ExtractionRecord.document_id).where(
                ExtractionRecord.job_id == job.id, ExtractionRecord.status == ExtractionStatus.SUCCEEDED
            )
        ))
    record_in_process_backfill(
        settings, instance, defs.resolve_asset_graph(), job, doc_ids, kb_slug=KB,
        run_ids=[run.run_id for run in runs], succeeded=succeeded, started_at=started,
    )
    return runs


def run_demo(settings: Settings, console: Console) -> DemoSummary:
    """Run the demo end to end; returns the figures of its summary."""
    from lumikb_pipeline.core.names import DOCUMENT_PROCESSING_JOB
    from lumikb_pipeline.infra.dagster_instance import open_instance
    from lumikb_pipeline.infra.tags import document_processing_tags
    from lumikb_pipeline.orchestration.in_process import run_documents_in_process
    from lumikb_pipeline.reextraction.service import Selection, start_reextraction
    from lumikb_pipeline.tracking.display import render_progress

    started = time.monotonic()
    console.rule(Text("lumikb demo", style="bold"))
    console.print(
        f"app database  {scrub(settings.effective_database_url)}\n"
        f"graph store   {'embedded, ' + str(settings.home_dir / 'graph.sqlite3') if settings.uses_embedded_graph else scrub(settings.neo4j_uri or '')}\n"  # noqa: E501
        f"redis         {'embedded' if settings.uses_embedded_redis else scrub(settings.redis_url or '')}\n"
        f"LLM           {settings.llm_model}, at most {settings.rate_limit} across all workers\n"
        f"dagster home  {settings.effective_dagster_home}",
        highlight=False,
    )
    migrate.ensure_database(settings.effective_database_url)
    _reset(settings, console)
    instance = open_instance(settings)

    console.rule("1. a KB and its documents")
    with session_scope(settings.effective_database_url) as session:
        kb_id = catalog.create_kb(session, KB, parse_schema_file(SCHEMA_V1), name="LumiKB demo").id
    report = catalog.ingest(settings.effective_database_url, KB, [CORPUS], settings.chunk_tokens)
    with session_scope(settings.effective_database_url) as session:
        chunks = session.scalar(
            select(func.count()).select_from(Document).join(Document.chunks).where(Document.kb_id == kb_id)
        )
    console.print(f"KB {KB!r} at schema version 1; ingested {len(report.added)} documents ({chunks} chunks)")

    console.rule("2. extraction (normal processing)")
    runs = run_documents_in_process(
        settings, report.document_ids, instance=instance, job_name=DOCUMENT_PROCESSING_JOB,
        tags=document_processing_tags(),
    )
    calls_v1, cached_v1 = _ledger_totals(settings, kb_id, 1)
    console.print(f"{len(runs)} Dagster runs, {calls_v1} LLM calls")

    console.rule("3. the schema evolves")
    with session_scope(settings.effective_database_url) as session:
        version, _ = catalog.set_schema(session, KB, parse_schema_file(SCHEMA_V2))
        drift = drift_report(session, KB)[0]
    console.print(
        f"schema version {version} adds Product, MAKES and PARTNERS_WITH: "
        f"{drift.outdated} of {drift.documents} documents are outdated; strategy {_strategy(settings, 1, version)}"
    )
    full_estimate = _estimate(settings, "full")

    console.rule("4. re-extraction of the outdated documents, as a job (only the added types are asked)")
    job = start_reextraction(settings, KB, Selection.outdated(), launch=False, instance=instance)
    client = redis_client.connect(settings)

    def show() -> Table:
        with session_scope(settings.effective_database_url) as session:
            return render_progress(job_progress(session, client, job.id))

    with Live(show(), console=console, refresh_per_second=4) as live:
        _run_job_as_backfill(settings, instance, job, report.document_ids, batch_size=6,
                             on_batch=lambda _run: live.update(show()))
        live.update(show())
    console.print()
    delta_calls, delta_prompt, delta_completion = _ledger_usage(settings, kb_id, version)
    console.print(
        f"delta paid:  {delta_calls} LLM calls, {_priced(delta_prompt, delta_completion)}\n"
        f"full would:  {full_estimate.llm_calls} LLM calls, "
        f"{_priced(full_estimate.estimated_prompt_tokens, full_estimate.estimated_completion_tokens)} (estimated)",
        highlight=False,
    )
    calls_v2, cached_v2 = _ledger_totals(settings, kb_id, version)

    console.rule("5. the schema evolves again: PARTNERS_WITH removed, Person renamed Individual")
    with session_scope(settings.effective_database_url) as session:
        previous = version
        version, _ = catalog.set_schema(session, KB, parse_schema_file(SCHEMA_V3))
    console.print(f"schema version {version}: strategy {_strategy(settings, previous, version)}", highlight=False)
    migration = start_reextraction(settings, KB, Selection.outdated(), launch=False, instance=instance)
    _run_job_as_backfill(settings, instance, migration, report.document_ids)
    calls_v3, cached_v3 = _ledger_totals(settings, kb_id, version)
    console.print(
        f"{migration.total_documents} documents migrated in the graph with {calls_v3} LLM calls: every Person is an "
        "Individual, with its relationships and provenance", highlight=False,
    )

    console.rule("6. the same job again: every chunk comes from its checkpoint")
    rerun = start_reextraction(settings, KB, Selection.all(), launch=False, instance=instance)
    _run_job_as_backfill(settings, instance, rerun, report.document_ids)
    rerun_calls, rerun_cached = _ledger_totals(settings, kb_id, version)
    console.print(
        f"re-run of all {rerun.total_documents} documents: {rerun_calls} LLM calls, "
        f"{rerun_cached} chunks from checkpoints"
    )

    console.rule("7. the graph invariant checks (knowledge_graph's asset checks)")
    from lumikb_pipeline.orchestration.in_process import run_graph_checks_in_process

    checks = run_graph_checks_in_process(instance)
    console.print(
        ", ".join(f"{name}: {'passed' if passed else 'FAILED'}" for name, passed in checks.items()), highlight=False
    )

    store = open_graph_store(settings)
    try:
        counts = store.counts(KB)
    finally:
        store.close()
    return DemoSummary(
        documents=counts.documents, entities=counts.entities, relationships=counts.relationships,
        llm_calls=calls_v1 + calls_v2 + calls_v3 + rerun_calls,
        checkpoints_reused=cached_v1 + cached_v2 + cached_v3 + rerun_cached,
        seconds=time.monotonic() - started, job_id=job.id,
    )


def _strategy(settings: Settings, from_version: int, to_version: int) -> str:
    with session_scope(settings.effective_database_url) as session:
        diff = catalog.schema_diff(session, catalog.get_kb(session, KB), from_version, to_version)
    return diff.strategy


def _estimate(settings: Settings, strategy: str) -> ReextractionEstimate:
    """The dry-run estimate of re-extracting the demo's outdated documents with `strategy`."""
    from lumikb_pipeline.reextraction.service import Selection, select_documents

    with session_scope(settings.effective_database_url) as session:
        kb = catalog.get_kb(session, KB)
        doc_ids = select_documents(session, kb, Selection.outdated())
        return estimate_reextraction(session, kb, catalog.current_schema(session, kb), kb.current_schema_version,
                                     settings.llm_model, doc_ids, "full" if strategy == "full" else "auto")


def print_summary(summary: DemoSummary, settings: Settings, console: Console) -> None:
    table = Table(title="lumikb demo: summary", show_header=True)
    table.add_column("")
    table.add_column("", justify="right")
    table.add_row("documents", str(summary.documents))
    table.add_row("entities", str(summary.entities))
    table.add_row("relationships", str(summary.relationships))
    table.add_row("LLM calls", str(summary.llm_calls))
    table.add_row("checkpoints reused", str(summary.checkpoints_reused))
    table.add_row("time", f"{summary.seconds:.1f} s")
    console.print(table)
    console.print(
        "where to look next: run these commands as they are, from the repository root (where workspace.yaml is);\n"
        "they name the demo's state, which lives in LUMIKB_HOME, so they work from any shell:",
        highlight=False, soft_wrap=True,
    )
    for command, what in next_steps(summary, settings):
        console.print(f"  # {what}\n  {command}", highlight=False, soft_wrap=True, markup=False)


def next_steps(summary: DemoSummary, settings: Settings) -> list[tuple[str, str]]:
    """The demo's hint: complete commands (with the environment they need) and what each shows."""
    env = f"LUMIKB_HOME={shlex.quote(str(settings.home_dir))}"
    dagster_env = f"{env} DAGSTER_HOME={shlex.quote(str(settings.effective_dagster_home))}"
    return [
        (f"{env} lumikb progress {summary.job_id}", "the re-extraction job's progress"),
        (f"{env} lumikb drift", "outdated documents per KB"),
        (f"{dagster_env} dagster dev -w workspace.yaml",
         "the Dagster UI (http://localhost:3000): runs, partitions, asset checks, the drift schedule"),
    ]
