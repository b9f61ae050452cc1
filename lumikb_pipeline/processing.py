"""Extraction of documents, in the two stages that Dagster runs as two ops (and the demo in-process):

1. `extract_documents`: claim each document's ledger row, send its chunks to the LLM (rate-limited,
   checkpointed: every validated chunk result is stored as a chunk checkpoint as soon as it exists).
2. `write_documents`: read those checkpoints back, build each document's graph contribution, write
   it in one transaction, and close the ledger row.

The checkpoint table is the hand-over between the stages, so nothing large passes between steps and
a crash between them costs no LLM call. One document's failure never fails the others: each stage
returns one `DocumentOutcome` per document.

For documents of a job, both stages also obey the job's stop conditions (`lumikb cancel`, the
`--max-cost` budget: `control.JobControl`), report every final outcome to the job's progress in
Redis, and close the job once its last document is final.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import select

from lumikb_pipeline import progress, redis_client
from lumikb_pipeline.config import Settings
from lumikb_pipeline.control import JobControl
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.models import Chunk, Document, ExtractionStatus, KnowledgeBase, SchemaVersion
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure, GraphChunk
from lumikb_pipeline.domain.schema import DomainSchema, schema_from_json
from lumikb_pipeline.domain.schema_diff import Strategy
from lumikb_pipeline.errors import LumikbError
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline.llm import checkpoints
from lumikb_pipeline.llm.checkpoints import CheckpointKey, load_checkpoints
from lumikb_pipeline.llm.extractor import ChunkExtractor, ChunkInput, DeltaTask
from lumikb_pipeline.llm.prompt import derived_prompt_version, effective_prompt_version
from lumikb_pipeline.pipeline.migration import SchemaHistory, StrategyOption, chunk_work, plan_documents
from lumikb_pipeline.scrub import scrub

OutcomeStatus = Literal["extracted", "succeeded", "failed", "skipped", "cancelled"]


@dataclass
class DocumentOutcome:
    """One document's result in one stage."""

    doc_id: str
    status: OutcomeStatus
    schema_version: int
    entities: int = 0
    relationships: int = 0
    chunks: int = 0
    llm_calls: int = 0
    cached_chunks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    error: str | None = None
    strategy: str = "full"  # how it reached its version: full | delta | graph-only | none (schema_diff)

    def ledger_outcome(self) -> ledger.Outcome:
        return ledger.Outcome(
            entity_count=self.entities, relationship_count=self.relationships, llm_calls=self.llm_calls,
            cached_chunks=self.cached_chunks, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, cost_usd=self.cost_usd,
        )


@dataclass
class _DocumentWork:
    doc_id: str
    kb_id: int
    kb_slug: str
    schema_version: int
    schema: DomainSchema
    chunks: list[ChunkInput] = field(default_factory=list)
    ordinals: dict[str, int] = field(default_factory=dict)
    strategy: Strategy = "full"


def target_version(settings: Settings, doc_id: str, requested: int | None) -> int:
    """The schema version to extract a document at: the one requested, else its KB's current one."""
    if requested is not None:
        return requested
    with session_scope(settings.effective_database_url) as session:
        version = session.scalar(
            select(KnowledgeBase.current_schema_version).join(Document).where(Document.id == doc_id)
        )
    if version is None:
        raise LumikbError(f"document {doc_id} does not exist")
    return version


def _load_work(settings: Settings, doc_ids: Sequence[str], schema_version: int | None) -> dict[str, _DocumentWork]:
    work: dict[str, _DocumentWork] = {}
    schemas: dict[tuple[int, int], DomainSchema] = {}
    with session_scope(settings.effective_database_url) as session:
        documents = session.execute(
            select(Document, KnowledgeBase).join(KnowledgeBase).where(Document.id.in_(list(doc_ids)))
        ).tuples()
        for document, kb in documents:
            version = schema_version or kb.current_schema_version
            if (kb.id, version) not in schemas:
                definition = session.scalar(
                    select(SchemaVersion.definition).where(
                        SchemaVersion.kb_id == kb.id, SchemaVersion.version == version
                    )
                )
                if definition is None:
                    raise LumikbError(f"KB {kb.slug} has no schema version {version}")
                schemas[(kb.id, version)] = schema_from_json(definition)
            item = _DocumentWork(document.id, kb.id, kb.slug, version, schemas[(kb.id, version)])
            if document.deleted_at is None:
                for chunk in session.scalars(select(Chunk).where(Chunk.document_id == document.id)):
                    item.chunks.append(ChunkInput(id=chunk.id, text=chunk.text, content_hash=chunk.content_hash))
                    item.ordinals[chunk.id] = chunk.ordinal
            work[document.id] = item
    return work


def extract_documents(
    settings: Settings,
    extractor: ChunkExtractor,
    doc_ids: Sequence[str],
    *,
    claimant: str,
    job_id: str | None = None,
    schema_version: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    strategy: StrategyOption = "auto",
) -> list[DocumentOutcome]:
    """Stage 1: claim and extract. Documents already succeeded at this version and revision are
    `skipped` (a retried step does not redo them); claimed documents whose chunks all have a
    checkpoint now are `extracted` and stay claimed by `claimant` for stage 2.

    With `strategy="auto"` each document takes the cheapest correct way from the version it was
    extracted at (`pipeline.migration`): its previous extraction migrated (`graph-only`), plus the
    added types asked of the LLM (`delta`), or a `full` extraction; `"full"` extracts every chunk anew."""
    started = time.monotonic()
    stop = _stop_check(settings, job_id, should_stop)
    work = _load_work(settings, doc_ids, schema_version)
    outcomes: dict[str, DocumentOutcome] = {}
    claimed: list[_DocumentWork] = []
    with session_scope(settings.effective_database_url) as session:
        for doc_id in doc_ids:
            item = work.get(doc_id)
            if item is None:
                outcomes[doc_id] = DocumentOutcome(
                    doc_id, "failed", schema_version or 0, error=f"document {doc_id} does not exist"
                )
                continue
            ledger.ensure_records(session, item.kb_id, [doc_id], item.schema_version, job_id)
            if ledger.claim(session, doc_id, item.schema_version, claimant, job_id):
                claimed.append(item)
            else:
                outcomes[doc_id] = DocumentOutcome(doc_id, "skipped", item.schema_version)

    results: dict[str, ChunkExtraction | ChunkFailure] = {}
    for (kb_id, version), group in _group_by_schema(claimed).items():
        schema = group[0].schema
        full_chunks, deltas = _migrate(settings, extractor.model, kb_id, version, schema, group, strategy, results)
        for result in extractor.extract_sync(kb_id, version, schema, full_chunks, stop, stop.on_result):
            results[result.chunk_id] = result
        for task, delta_chunks in deltas:
            for result in extractor.extract_sync(kb_id, version, schema, delta_chunks, stop, stop.on_result, task):
                results[result.chunk_id] = result

    elapsed = time.monotonic() - started
    with session_scope(settings.effective_database_url) as session:
        for item in claimed:
            outcome = DocumentOutcome(item.doc_id, "extracted", item.schema_version, chunks=len(item.chunks),
                                      strategy=item.strategy)
            failures: list[ChunkFailure] = []
            for chunk in item.chunks:
                result = results[chunk.id]
                outcome.llm_calls += result.llm_calls
                if isinstance(result, ChunkFailure):
                    failures.append(result)
                    continue
                outcome.cached_chunks += int(result.from_checkpoint)
                outcome.prompt_tokens += result.prompt_tokens
                outcome.completion_tokens += result.completion_tokens
                outcome.cost_usd += result.cost_usd
            outcome.duration_s = elapsed
            if failures and all(f.reason == "cancelled" for f in failures):
                outcome.status = "cancelled"
                outcome.error = f"{stop.describe()} before every chunk was extracted; the graph was not changed"
                ledger.mark_cancelled(session, item.doc_id, item.schema_version, claimant, outcome.error)
            elif failures:
                first = failures[0]
                outcome.status = "failed"
                outcome.error = scrub(
                    f"{len(failures)} of {len(item.chunks)} chunks failed; chunk {first.chunk_id}: {first.reason}"
                )
                ledger.mark_failed(session, item.doc_id, item.schema_version, claimant, outcome.error,
                                   outcome.ledger_outcome())
            outcomes[item.doc_id] = outcome
    _report(settings, job_id, [outcomes[doc_id] for doc_id in doc_ids])
    return [outcomes[doc_id] for doc_id in doc_ids]


def _migrate(
    settings: Settings, model: str, kb_id: int, version: int, schema: DomainSchema, group: Sequence[_DocumentWork],
    strategy: StrategyOption, results: dict[str, ChunkExtraction | ChunkFailure],
) -> tuple[list[ChunkInput], list[tuple[DeltaTask, list[ChunkInput]]]]:
    """Plan each document of `group` (`pipeline.migration`) and do what needs no LLM: migrated chunks
    of `graph-only` documents are stored as derived checkpoints and put in `results`. Returns the
    chunks to extract in full and, per delta, the chunks to ask it for."""
    full_chunks: list[ChunkInput] = []
    deltas: dict[int, tuple[DeltaTask, list[ChunkInput]]] = {}
    derived = CheckpointKey(kb_id, version, derived_prompt_version(schema), model)
    with session_scope(settings.effective_database_url) as session:
        history = SchemaHistory(session, kb_id)
        plans = plan_documents(session, kb_id, version, [item.doc_id for item in group], strategy, history)
        for item in group:
            plan = plans[item.doc_id]
            item.strategy = plan.strategy
            if plan.strategy == "full":
                full_chunks.extend(item.chunks)
                continue
            work = chunk_work(session, kb_id, plan, model, item.chunks, history)
            request = plan.delta
            for chunk in item.chunks:
                migrated = work.migrated.get(chunk.content_hash)
                if migrated is None:
                    full_chunks.append(chunk)  # no previous extraction of this text: extracted in full
                elif request is not None:
                    assert plan.from_version is not None
                    task, chunks = deltas.setdefault(plan.from_version, (DeltaTask(request, {}), []))
                    assert isinstance(task.bases, dict)
                    task.bases[chunk.content_hash] = migrated
                    chunks.append(chunk)
                else:
                    checkpoints.save(session, derived, chunk.content_hash, migrated)
                    results[chunk.id] = migrated.model_copy(update={"chunk_id": chunk.id, "from_checkpoint": True})
    return full_chunks, list(deltas.values())


@dataclass
class _StopCheck:
    """The job's stop conditions (cancel, budget) combined with the caller's own check."""

    control: JobControl | None
    caller: Callable[[], bool] | None

    def __call__(self) -> bool:
        return bool(
            (self.control is not None and self.control.should_stop()) or (self.caller is not None and self.caller())
        )

    @property
    def cancelled(self) -> bool:
        """Stopped for a reason other than the budget (a cancel, or the caller)."""
        return self() and not (self.control is not None and self.control.stop_reason == "budget")

    def describe(self) -> str:
        if not self.cancelled and self.control is not None:
            return f"the job reached its budget of ${self.control.max_cost_usd:g}"
        return "the job was cancelled"

    def on_result(self, outcome: ChunkExtraction | ChunkFailure) -> None:
        if self.control is not None:
            self.control.on_result(outcome)


def _stop_check(settings: Settings, job_id: str | None, should_stop: Callable[[], bool] | None) -> _StopCheck:
    if job_id is None:
        return _StopCheck(None, should_stop)
    client = redis_client.connect(settings)
    return _StopCheck(JobControl.for_job(client, settings.effective_database_url, job_id), should_stop)


def _report(settings: Settings, job_id: str | None, outcomes: Sequence[DocumentOutcome]) -> None:
    """Report final outcomes to the job's progress and close the job when it is done."""
    if job_id is None:
        return
    final = [o for o in outcomes if o.status in ("succeeded", "failed", "cancelled", "skipped")]
    if final:
        progress.report(
            redis_client.connect(settings), job_id,
            [(o.doc_id, o.status, o.cost_usd, o.error) for o in final],
        )
    with session_scope(settings.effective_database_url) as session:
        ledger.finish_job_if_done(session, job_id)


def _group_by_schema(items: Sequence[_DocumentWork]) -> dict[tuple[int, int], list[_DocumentWork]]:
    groups: dict[tuple[int, int], list[_DocumentWork]] = {}
    for item in items:
        groups.setdefault((item.kb_id, item.schema_version), []).append(item)
    return groups


def write_documents(
    settings: Settings,
    graph_store: GraphStore,
    extracted: Sequence[DocumentOutcome],
    *,
    claimant: str,
    job_id: str | None = None,
    mode: Literal["replace", "merge"] = "replace",
    should_stop: Callable[[], bool] | None = None,
) -> list[DocumentOutcome]:
    """Stage 2: write the graph of each `extracted` document from its checkpoints and close its
    ledger row. Other outcomes pass through unchanged. A document is written whole or not at all:
    a cancel that arrives before its write keeps its previous graph and marks it `cancelled`."""
    stop = _stop_check(settings, job_id, should_stop)
    to_write = [o for o in extracted if o.status == "extracted"]
    work: dict[str, _DocumentWork] = {}
    for version in {o.schema_version for o in to_write}:
        # Each document at the version stage 1 extracted it at (which may not be the KB's current one).
        work.update(_load_work(settings, [o.doc_id for o in to_write if o.schema_version == version], version))
    results: list[DocumentOutcome] = []
    for outcome in extracted:
        if outcome.status != "extracted":
            results.append(outcome)
            continue
        started = time.monotonic()
        item = work[outcome.doc_id]
        with session_scope(settings.effective_database_url) as session:
            if stop.cancelled:
                outcome.status = "cancelled"
                outcome.error = "the job was cancelled before the graph write; the previous graph is kept"
                ledger.mark_cancelled(session, item.doc_id, item.schema_version, claimant, outcome.error)
                results.append(outcome)
                continue
            try:
                extractions = load_checkpoints(
                    session, item.kb_id, item.schema_version,
                    effective_prompt_version(item.schema), settings.llm_model, item.chunks,
                )
                if len(extractions) < len(item.chunks):
                    # Chunks migrated from an earlier version (graph-only, delta) have a derived checkpoint.
                    done = {e.chunk_id for e in extractions}
                    extractions += load_checkpoints(
                        session, item.kb_id, item.schema_version, derived_prompt_version(item.schema),
                        settings.llm_model, [c for c in item.chunks if c.id not in done],
                    )
                if len(extractions) != len(item.chunks):
                    raise LumikbError(
                        f"{len(item.chunks) - len(extractions)} of the document's chunks have no checkpoint at "
                        f"schema version {item.schema_version}; re-run the document to extract them"
                    )
                graph = build_document_graph(
                    item.kb_slug, item.doc_id, item.schema_version,
                    [GraphChunk(id=c.id, ordinal=item.ordinals[c.id]) for c in item.chunks],
                    extractions,
                )
                summary = graph_store.write_document(graph, item.schema, mode)
                outcome.entities, outcome.relationships = summary.entities, summary.relationships
                outcome.status = "succeeded"
                outcome.duration_s += time.monotonic() - started
                ledger.mark_succeeded(session, item.doc_id, item.schema_version, claimant, outcome.ledger_outcome())
            except LumikbError as exc:  # a schema violation or an invalid graph: this document only
                outcome.status = "failed"
                outcome.error = scrub(str(exc))
                ledger.mark_failed(session, item.doc_id, item.schema_version, claimant, outcome.error,
                                   outcome.ledger_outcome())
        results.append(outcome)
    written = {o.doc_id for o in to_write}
    _report(settings, job_id, [o for o in results if o.doc_id in written])
    return results


__all__ = [
    "DocumentOutcome", "ExtractionStatus", "extract_documents", "write_documents", "target_version",
]
