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

Claims are leases (`db.ledger`): stage 1 renews its leases while it works (`_LeaseKeeper`, every
third of the lease), and stage 2 renews the claim in the transaction that records the result,
before the graph write. A document whose claim was lost (its lease expired, another worker took
it) is never written by this step: its outcome is `lost` and the other worker's result stands.

Nothing is left `running` by an error: when a stage stops on an error of the infrastructure (the
database, Redis, Neo4j: anything not handled per document), the rows it still holds are marked
`failed` with the (scrubbed) error, which reaches the job's `recent_errors`, and the error is raised
for the step's retry. A step of a job that has ended does nothing (a late redelivery), and a
document whose attempts keep dying is given up (`ledger.give_up_if_dying`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
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
from lumikb_pipeline.errors import LumikbError
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline.llm.checkpoints import load_checkpoints
from lumikb_pipeline.llm.extractor import ChunkExtractor, ChunkInput
from lumikb_pipeline.llm.prompt import effective_prompt_version
from lumikb_pipeline.scrub import scrub

# `lost`: another worker holds the document now (this step's claim expired and was taken); this step
# left it alone, and it is not final for the job (the other worker reports it).
OutcomeStatus = Literal["extracted", "succeeded", "failed", "skipped", "cancelled", "lost"]


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


def _lost_claim(doc_id: str, claimant: str) -> str:
    return (
        f"claim lost: the lease of {claimant} on document {doc_id} expired and another worker took it; "
        "this step left the document to that worker"
    )


class _LeaseKeeper:
    """Renews a step's leases on the documents it works on, every third of the lease, until closed,
    and remembers the documents whose claim was lost. A renewal that fails (a database hiccup) is
    retried at the next beat; the lease has two more beats of margin."""

    def __init__(self, settings: Settings, items: Sequence[_DocumentWork], claimant: str, lease: timedelta) -> None:
        self._database_url = settings.effective_database_url
        self._by_version: dict[int, list[str]] = {}
        for item in items:
            self._by_version.setdefault(item.schema_version, []).append(item.doc_id)
        self._claimant = claimant
        self._lease = lease
        self.lost: set[str] = set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-keeper-{claimant[:24]}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        if self._by_version:
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def renew(self) -> set[str]:
        """Renew every lease now; returns the documents lost so far."""
        with session_scope(self._database_url) as session:
            for version, doc_ids in self._by_version.items():
                held = ledger.renew(session, doc_ids, version, self._claimant, self._lease)
                self.lost.update(doc_id for doc_id in doc_ids if doc_id not in held)
        for version, doc_ids in self._by_version.items():
            self._by_version[version] = [doc_id for doc_id in doc_ids if doc_id not in self.lost]
        return self.lost

    def _beat(self) -> None:
        while not self._closed.wait(self._lease.total_seconds() / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a hiccup of the database: the next beat tries again
                continue


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
    lease: timedelta = ledger.DEFAULT_LEASE,
) -> list[DocumentOutcome]:
    """Stage 1: claim and extract. Documents already succeeded at this version and revision are
    `skipped` (a retried step does not redo them); claimed documents whose chunks all have a
    checkpoint now are `extracted` and stay claimed by `claimant` for stage 2. The claims' leases
    (`lease` long) are renewed while the extraction runs, and once more at its end; a document
    whose claim was lost meanwhile is `lost`."""
    started = time.monotonic()
    if job_id is not None and not _job_is_active(settings, job_id):
        # A late redelivery of a step of an ended job: claim, cancel and close nothing.
        ended = f"job {job_id} has ended; this step did nothing"
        return [
            DocumentOutcome(doc_id, "skipped", schema_version or 0, error=ended)
            for doc_id in doc_ids
        ]
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
            given_up = ledger.give_up_if_dying(session, doc_id, item.schema_version, claimant)
            if given_up is not None:
                outcomes[doc_id] = DocumentOutcome(doc_id, "failed", item.schema_version, error=given_up)
            elif ledger.claim(session, doc_id, item.schema_version, claimant, job_id, lease):
                claimed.append(item)
            else:
                outcomes[doc_id] = DocumentOutcome(doc_id, "skipped", item.schema_version)

    try:
        results: dict[str, ChunkExtraction | ChunkFailure] = {}
        with _LeaseKeeper(settings, claimed, claimant, lease) as leases:
            for (kb_id, version), group in _group_by_schema(claimed).items():
                chunk_inputs = [chunk for item in group for chunk in item.chunks]
                for result in extractor.extract_sync(
                    kb_id, version, group[0].schema, chunk_inputs, stop, stop.on_result
                ):
                    results[result.chunk_id] = result
        lost = leases.renew() if claimed else set()  # a full lease for the hand-over to stage 2

        elapsed = time.monotonic() - started
        with session_scope(settings.effective_database_url) as session:
            for item in claimed:
                outcome = DocumentOutcome(item.doc_id, "extracted", item.schema_version, chunks=len(item.chunks))
                if item.doc_id in lost:
                    outcome.status, outcome.error = "lost", _lost_claim(item.doc_id, claimant)
                    outcomes[item.doc_id] = outcome
                    continue
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
                    if not ledger.mark_cancelled(session, item.doc_id, item.schema_version, claimant, outcome.error):
                        outcome.status, outcome.error = "lost", _lost_claim(item.doc_id, claimant)
                elif failures:
                    first = failures[0]
                    outcome.status = "failed"
                    outcome.error = scrub(
                        f"{len(failures)} of {len(item.chunks)} chunks failed; chunk {first.chunk_id}: {first.reason}"
                    )
                    if not ledger.mark_failed(session, item.doc_id, item.schema_version, claimant, outcome.error,
                                              outcome.ledger_outcome()):
                        outcome.status, outcome.error = "lost", _lost_claim(item.doc_id, claimant)
                outcomes[item.doc_id] = outcome
    except Exception as exc:
        _fail_held(settings, claimed, claimant, job_id, exc)
        raise
    _report(settings, job_id, [outcomes[doc_id] for doc_id in doc_ids])
    return [outcomes[doc_id] for doc_id in doc_ids]


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


def _job_is_active(settings: Settings, job_id: str) -> bool:
    with session_scope(settings.effective_database_url) as session:
        return ledger.job_is_active(session, job_id)


def _fail_held(
    settings: Settings, items: Sequence[_DocumentWork], claimant: str, job_id: str | None, exc: Exception
) -> None:
    """After an error that stops a stage: mark the rows it still holds `failed` with the error and
    report them (the job is not closed: the step's retry may still finish them). When the database
    or Redis is what failed, this may fail too; the rows are then closed by the reaper
    (`ledger.reap_abandoned`) once their lease expires."""
    error = scrub(
        f"the step stopped on an error of the infrastructure: {type(exc).__name__}: {exc}".strip()
    )[:1000] + "; the step's retry extracts the document again"
    failed: list[DocumentOutcome] = []
    try:
        with session_scope(settings.effective_database_url) as session:
            for item in items:
                if ledger.mark_failed(session, item.doc_id, item.schema_version, claimant, error):
                    failed.append(DocumentOutcome(item.doc_id, "failed", item.schema_version, error=error))
        _report(settings, job_id, failed, close=False)
    except Exception:  # noqa: BLE001 - the original error is what the caller raises
        return


def _report(
    settings: Settings, job_id: str | None, outcomes: Sequence[DocumentOutcome], *, close: bool = True
) -> None:
    """Report final outcomes to the job's progress and close the job when it is done."""
    if job_id is None:
        return
    final = [o for o in outcomes if o.status in ("succeeded", "failed", "cancelled", "skipped")]
    if final:
        progress.report(
            redis_client.connect(settings), job_id,
            [(o.doc_id, o.status, o.cost_usd, o.error) for o in final],
        )
    if not close:
        return
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
    lease: timedelta = ledger.DEFAULT_LEASE,
) -> list[DocumentOutcome]:
    """Stage 2: write the graph of each `extracted` document from its checkpoints and close its
    ledger row. Other outcomes pass through unchanged. A document is written whole or not at all:
    a cancel that arrives before its write keeps its previous graph and marks it `cancelled`.

    The claim is renewed first, in the transaction that records the result (which holds the row
    until the result is recorded): a document whose claim was lost is not written (`lost`)."""
    stop = _stop_check(settings, job_id, should_stop)
    to_write = [o for o in extracted if o.status == "extracted"]
    work: dict[str, _DocumentWork] = {}
    for version in {o.schema_version for o in to_write}:
        # Each document at the version stage 1 extracted it at (which may not be the KB's current one).
        work.update(_load_work(settings, [o.doc_id for o in to_write if o.schema_version == version], version))
    results: list[DocumentOutcome] = []
    try:
        for outcome in extracted:
            if outcome.status != "extracted":
                results.append(outcome)
                continue
            started = time.monotonic()
            item = work[outcome.doc_id]
            with session_scope(settings.effective_database_url) as session:
                if not ledger.renew(session, [item.doc_id], item.schema_version, claimant, lease):
                    outcome.status, outcome.error = "lost", _lost_claim(item.doc_id, claimant)
                    results.append(outcome)
                    continue
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
                    if summary.refused:  # a newer extraction was written first: keep it, say so
                        outcome.status = "skipped"
                        outcome.error = (
                            f"not written: the graph already holds document {item.doc_id} at schema version "
                            f"{summary.newer_version_held}, newer than this extraction's {item.schema_version}"
                        )
                        ledger.mark_skipped(session, item.doc_id, item.schema_version, claimant, outcome.error)
                        results.append(outcome)
                        continue
                    outcome.entities, outcome.relationships = summary.entities, summary.relationships
                    outcome.status = "succeeded"
                    outcome.duration_s += time.monotonic() - started
                    if not ledger.mark_succeeded(session, item.doc_id, item.schema_version, claimant,
                                                 outcome.ledger_outcome()):
                        # Cannot happen: the renewal above holds the row until this transaction ends.
                        raise RuntimeError(
                            f"the ledger row of document {item.doc_id} at schema version {item.schema_version} "
                            f"changed while {claimant} held it"
                        )
                except LumikbError as exc:  # a schema violation or an invalid graph: this document only
                    outcome.status = "failed"
                    outcome.error = scrub(str(exc))
                    ledger.mark_failed(session, item.doc_id, item.schema_version, claimant, outcome.error,
                                       outcome.ledger_outcome())
            results.append(outcome)
    except Exception as exc:
        done = {o.doc_id for o in results}
        _fail_held(settings, [work[o.doc_id] for o in to_write if o.doc_id not in done], claimant, job_id, exc)
        raise
    written = {o.doc_id for o in to_write}
    _report(settings, job_id, [o for o in results if o.doc_id in written])
    return results


__all__ = [
    "DocumentOutcome", "ExtractionStatus", "extract_documents", "write_documents", "target_version",
]
