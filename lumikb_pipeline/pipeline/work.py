"""What both stages share: the documents' work loaded from the database, one outcome per document,
the job's stop conditions, and reporting final outcomes to the job's progress."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import select

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.catalog import schema_at
from lumikb_pipeline.db.models import Chunk, Document, KnowledgeBase
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.llm.extractor import ChunkInput
from lumikb_pipeline.tracking import progress
from lumikb_pipeline.tracking.control import JobControl

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


def load_work(settings: Settings, doc_ids: Sequence[str], schema_version: int | None) -> dict[str, DocumentWork]:
    """Each document's work at `schema_version` (None: its KB's current one); a deleted document has no chunks."""
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


def stop_check(settings: Settings, job_id: str | None, should_stop: Callable[[], bool] | None) -> StopCheck:
    """The stop conditions of `job_id` (none without a job) combined with the caller's `should_stop`."""
    if job_id is None:
        return StopCheck(None, should_stop)
    client = redis_client.connect(settings)
    return StopCheck(JobControl.for_job(client, settings.effective_database_url, job_id), should_stop)


def report_outcomes(settings: Settings, job_id: str | None, outcomes: Sequence[DocumentOutcome]) -> None:
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


def group_by_schema(items: Sequence[DocumentWork]) -> dict[tuple[int, int], list[DocumentWork]]:
    """The documents grouped by (KB id, schema version): one extractor call per group."""
    groups: dict[tuple[int, int], list[DocumentWork]] = {}
    for item in items:
        groups.setdefault((item.kb_id, item.schema_version), []).append(item)
    return groups
