"""What both stages share: the documents' work loaded from the database, one outcome per document,
the job's stop conditions, the claims' leases, and reporting final outcomes to the job's progress.

Claims are leases (`db.ledger`): stage 1 renews its leases while it works (`LeaseKeeper`, every
third of the lease), and stage 2 renews the claim in the transaction that records the result,
before the graph write. A document whose claim was lost (its lease expired, another worker took
it) is never written by this step: its outcome is `lost` and the other worker's result stands.

Nothing is left `running` by an error: when a stage stops on an error of the infrastructure (the
database, Redis, Neo4j: anything not handled per document), the rows it still holds are marked
`failed` with the (scrubbed) error, which reaches the job's `recent_errors` (`fail_held`), and the
error is raised for the step's retry. A step of a job that has ended does nothing (a late
redelivery), and a document whose attempts keep dying is given up (`ledger.give_up_if_dying`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Literal

from sqlalchemy import select

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.catalog import schema_at
from lumikb_pipeline.db.models import Chunk, Document, KnowledgeBase
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure, ChunkInput
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.domain.schema_diff import Strategy
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.tracking import progress
from lumikb_pipeline.tracking.control import JobControl

# `lost`: another worker holds the document now (this step's claim expired and was taken); this step
# left it alone, and it is not final for the job (the other worker reports it).
# `handed_back`: the step's run failed while the step worked (its run process died and the watchdog
# failed it); the step stopped and left the document claimed by its run group, untouched, for the
# run's retry (same claimant) or, without one, the reaper. Not final for the job either.
OutcomeStatus = Literal["extracted", "succeeded", "failed", "skipped", "cancelled", "lost", "handed_back"]


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
class DocumentWork:
    """One document to extract or write: its KB, the schema version and its content, and its chunks."""

    doc_id: str
    kb_id: int
    kb_slug: str
    schema_version: int
    schema: DomainSchema
    chunks: list[ChunkInput] = field(default_factory=list)
    ordinals: dict[str, int] = field(default_factory=dict)
    strategy: Strategy = "full"


def handed_back(doc_id: str, claimant: str) -> str:
    return (
        f"the step's run failed while it worked on document {doc_id} (its process is gone); the step stopped "
        f"and left the document claimed by {claimant} for the run's retry"
    )


def lost_claim(doc_id: str, claimant: str) -> str:
    return (
        f"claim lost: the lease of {claimant} on document {doc_id} expired and another worker took it; "
        "this step left the document to that worker"
    )


class LeaseKeeper:
    """Renews a step's leases on the documents it works on, every third of the lease, until closed,
    and remembers the documents whose claim was lost. A renewal that fails (a database hiccup) is
    retried at the next beat; the lease has two more beats of margin."""

    def __init__(self, settings: Settings, items: Sequence[DocumentWork], claimant: str, lease: timedelta) -> None:
        self._database_url = settings.effective_database_url
        self._by_version: dict[int, list[str]] = {}
        for item in items:
            self._by_version.setdefault(item.schema_version, []).append(item.doc_id)
        self._claimant = claimant
        self._lease = lease
        self.lost: set[str] = set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-keeper-{claimant[:24]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
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


def load_work(settings: Settings, doc_ids: Sequence[str], schema_version: int | None) -> dict[str, DocumentWork]:
    work: dict[str, DocumentWork] = {}
    schemas: dict[tuple[int, int], DomainSchema] = {}
    with session_scope(settings.effective_database_url) as session:
        documents = session.execute(
            select(Document, KnowledgeBase).join(KnowledgeBase).where(Document.id.in_(list(doc_ids)))
        ).tuples()
        for document, kb in documents:
            version = schema_version or kb.current_schema_version
            if (kb.id, version) not in schemas:
                schemas[(kb.id, version)] = schema_at(session, kb, version)
            item = DocumentWork(document.id, kb.id, kb.slug, version, schemas[(kb.id, version)])
            if document.deleted_at is None:
                for chunk in session.scalars(select(Chunk).where(Chunk.document_id == document.id)):
                    item.chunks.append(ChunkInput(id=chunk.id, text=chunk.text, content_hash=chunk.content_hash))
                    item.ordinals[chunk.id] = chunk.ordinal
            work[document.id] = item
    return work


@dataclass
class StopCheck:
    """The job's stop conditions (cancel, budget) combined with the caller's own check, and whether a
    stop of the caller's is its run failing (`caller_failed`) rather than a cancel."""

    control: JobControl | None
    caller: Callable[[], bool] | None
    caller_failed: Callable[[], bool] | None = None

    def __call__(self) -> bool:
        return bool(
            (self.control is not None and self.control.should_stop()) or (self.caller is not None and self.caller())
        )

    @property
    def cancelled(self) -> bool:
        """Stopped for a reason other than the budget (a cancel, or the caller) or the caller's run failing."""
        return self() and not (self.control is not None and self.control.stop_reason == "budget") \
            and not self.handing_back

    @property
    def handing_back(self) -> bool:
        """Stopped only because the caller's run failed (its process died): the documents the step
        holds stay claimed, untouched, for the run's retry (`handed_back`), and are not cancelled."""
        return (
            self.caller_failed is not None and self.caller_failed()
            and not (self.control is not None and self.control.should_stop())
        )

    def describe(self) -> str:
        if not self.cancelled and self.control is not None:
            return f"the job reached its budget of ${self.control.max_cost_usd:g}"
        return "the job was cancelled"

    def on_result(self, outcome: ChunkExtraction | ChunkFailure) -> None:
        if self.control is not None:
            self.control.on_result(outcome)


def stop_check(
    settings: Settings, job_id: str | None, should_stop: Callable[[], bool] | None,
    run_failed: Callable[[], bool] | None = None,
) -> StopCheck:
    if job_id is None:
        return StopCheck(None, should_stop, run_failed)
    client = redis_client.connect(settings)
    return StopCheck(JobControl.for_job(client, settings.effective_database_url, job_id), should_stop, run_failed)


def job_takes_work(settings: Settings, job_id: str) -> bool:
    with session_scope(settings.effective_database_url) as session:
        return ledger.job_takes_work(session, job_id)


def fail_held(
    settings: Settings, items: Sequence[DocumentWork], claimant: str, job_id: str | None, exc: Exception
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
        report_outcomes(settings, job_id, failed, close=False)
    except Exception:  # noqa: BLE001 - the original error is what the caller raises
        return


def report_outcomes(
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


def group_by_schema(items: Sequence[DocumentWork]) -> dict[tuple[int, int], list[DocumentWork]]:
    groups: dict[tuple[int, int], list[DocumentWork]] = {}
    for item in items:
        groups.setdefault((item.kb_id, item.schema_version), []).append(item)
    return groups
