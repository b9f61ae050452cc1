"""The migration plan of a re-extraction: per document, the cheapest correct strategy to bring it to
the target schema version, and the chunk work it implies.

A document's strategy comes from the diff between the version it was last extracted at (its latest
succeeded ledger row) and the target (`domain.schema_diff`): `full` for a document never extracted,
or when the job forces it, or when the diff says so; otherwise its previous extraction is the
*source*: each chunk's checkpoint at that version (a full one, else a derived one), migrated to the
target. `graph-only` stops there (no LLM call); `delta` asks the LLM only for the added types. A
chunk without a source (its text changed since, or the model did) is extracted in full.

The migrated (and merged) results are stored as *derived* checkpoints at the target version
(`prompt.derived_prompt_version`), so the write stage builds every document's graph from
checkpoints alike, and a later schema change can start from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy.orm import Session

from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.catalog import schema_at
from lumikb_pipeline.db.models import KnowledgeBase
from lumikb_pipeline.domain.results import ChunkExtraction
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.domain.schema_diff import (
    DeltaRequest,
    SchemaDiff,
    Strategy,
    delta_request,
    diff_schemas,
    migrate_extraction,
)
from lumikb_pipeline.llm.checkpoints import CheckpointKey, HasContentHash, lookup
from lumikb_pipeline.llm.prompt import derived_prompt_version, effective_prompt_version

StrategyOption = Literal["auto", "full"]
STRATEGY_OPTIONS: tuple[StrategyOption, ...] = ("auto", "full")


@dataclass(frozen=True)
class DocumentPlan:
    """How one document gets to the target version."""

    doc_id: str
    strategy: Strategy
    from_version: int | None = None
    diff: SchemaDiff | None = None

    @property
    def delta(self) -> DeltaRequest | None:
        return delta_request(self.diff) if self.diff is not None and self.strategy == "delta" else None


@dataclass
class ChunkWork:
    """The chunks of documents planned `graph-only` or `delta`, split by what they need."""

    migrated: dict[str, ChunkExtraction] = field(default_factory=dict)  # content hash -> migrated source
    without_source: list[str] = field(default_factory=list)  # content hashes to extract in full


class SchemaHistory:
    """A KB's schema versions, read once each, and the diffs between them."""

    def __init__(self, session: Session, kb_id: int) -> None:
        self.session = session
        self.kb_id = kb_id
        self._schemas: dict[int, DomainSchema] = {}
        self._diffs: dict[tuple[int, int], SchemaDiff] = {}

    def schema(self, version: int) -> DomainSchema:
        if version not in self._schemas:
            self._schemas[version] = schema_at(self.session, self.session.get_one(KnowledgeBase, self.kb_id), version)
        return self._schemas[version]

    def diff(self, from_version: int, to_version: int) -> SchemaDiff:
        if (from_version, to_version) not in self._diffs:
            chain = [self.schema(v) for v in range(from_version, to_version + 1)]
            self._diffs[(from_version, to_version)] = diff_schemas(chain, from_version, to_version)
        return self._diffs[(from_version, to_version)]


def plan_documents(
    session: Session, kb_id: int, target_version: int, doc_ids: Iterable[str], option: StrategyOption = "auto",
    history: SchemaHistory | None = None,
) -> dict[str, DocumentPlan]:
    """Each document's plan to reach `target_version` (see the module docstring)."""
    doc_ids = list(doc_ids)
    if option == "full":
        return {doc_id: DocumentPlan(doc_id, "full") for doc_id in doc_ids}
    history = history or SchemaHistory(session, kb_id)
    latest = ledger.latest_succeeded_versions(session, kb_id, doc_ids)
    plans: dict[str, DocumentPlan] = {}
    for doc_id in doc_ids:
        from_version = latest.get(doc_id)
        if from_version is None or from_version > target_version:
            plans[doc_id] = DocumentPlan(doc_id, "full")
            continue
        diff = history.diff(from_version, target_version)
        plans[doc_id] = DocumentPlan(doc_id, diff.strategy, from_version, diff)
    return plans


def source_extractions(
    session: Session, kb_id: int, version: int, schema: DomainSchema, model: str, hashes: Iterable[str]
) -> dict[str, ChunkExtraction]:
    """The extraction of each chunk content at `version`: its full checkpoint, else its derived one."""
    wanted = set(hashes)
    found = lookup(session, CheckpointKey(kb_id, version, effective_prompt_version(schema), model), wanted)
    missing = wanted - set(found)
    if missing:
        found.update(lookup(session, CheckpointKey(kb_id, version, derived_prompt_version(schema), model), missing))
    return found


def chunk_work(
    session: Session, kb_id: int, plan: DocumentPlan, model: str, chunks: Sequence[HasContentHash],
    history: SchemaHistory,
) -> ChunkWork:
    """For a `graph-only`, `delta` or `none` document: each chunk's migrated source, or that it has none."""
    assert plan.diff is not None and plan.from_version is not None
    sources = source_extractions(session, kb_id, plan.from_version, history.schema(plan.from_version), model,
                                 (c.content_hash for c in chunks))
    work = ChunkWork()
    for chunk in chunks:
        source = sources.get(chunk.content_hash)
        if source is None:
            if chunk.content_hash not in work.without_source:
                work.without_source.append(chunk.content_hash)
        elif chunk.content_hash not in work.migrated:
            work.migrated[chunk.content_hash] = migrate_extraction(source, plan.diff)
    return work
