"""What a re-extraction would cost, before it starts (`lumikb reextract --dry-run`).

Per document the strategy is planned as the job would (`pipeline.migration`); then, per strategy:

- **calls** are counted exactly: one per distinct chunk content still to send (full extractions: no
  full checkpoint at the target; delta: no derived checkpoint at the target; chunks without a
  previous extraction to migrate go in full). Retries cannot be known in advance.
- **prompt tokens** are counted with tiktoken on the prompt actually built for each chunk (the full
  prompt, or the delta prompt with the chunk's known entities), plus the chat format's per-message
  overhead (`prompt.chat_prompt_tokens`).
- **completion tokens** come from a model learned from this KB's own history: the completion tokens
  per chunk token of the LLM results it already paid for (its chunk checkpoints, full and delta
  apart). Without history: `DEFAULT_COMPLETION` (stated in the output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lumikb_pipeline.db.models import Chunk, ChunkCheckpoint, Document, KnowledgeBase
from lumikb_pipeline.domain.batching import chunked
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.domain.schema_diff import DeltaRequest
from lumikb_pipeline.llm.checkpoints import CheckpointKey, lookup
from lumikb_pipeline.llm.cost import estimate_cost, is_priced
from lumikb_pipeline.llm.prompt import (
    build_delta_messages,
    build_messages,
    chat_prompt_tokens,
    derived_prompt_version,
    effective_prompt_version,
)
from lumikb_pipeline.pipeline.migration import SchemaHistory, StrategyOption, chunk_work, plan_documents

ANSWER_ENVELOPE_TOKENS = 40
DEFAULT_COMPLETION = "40 tokens + half the chunk's tokens per call (no extraction history in this KB yet)"
_BATCH = 1000


def estimated_answer_tokens(chunk_tokens: int) -> int:
    """The assumed size of the model's answer for a chunk of `chunk_tokens` tokens, without history."""
    return ANSWER_ENVELOPE_TOKENS + chunk_tokens // 2


@dataclass(frozen=True)
class CompletionModel:
    """Completion tokens per chunk token, learned from a KB's paid results (None: no history)."""

    full_ratio: float | None
    full_samples: int
    delta_ratio: float | None
    delta_samples: int

    def full(self, chunk_tokens: int) -> int:
        if self.full_ratio is None:
            return estimated_answer_tokens(chunk_tokens)
        return round(self.full_ratio * chunk_tokens)

    def delta(self, chunk_tokens: int, request: DeltaRequest) -> int:
        if self.delta_ratio is not None:
            return round(self.delta_ratio * chunk_tokens)
        # No delta history: the full answer's share of the types asked.
        target = request.target
        asked = len(request.ask.entity_types) + len(request.ask.relationship_types)
        share = asked / max(1, len(target.entity_types) + len(target.relationship_types))
        return max(1, round(self.full(chunk_tokens) * share))

    def describe(self) -> str:
        if self.full_ratio is None:
            return DEFAULT_COMPLETION
        text = f"{self.full_ratio:.3f} completion tokens per chunk token (learned from {self.full_samples} chunks)"
        if self.delta_ratio is not None:
            text += f"; delta {self.delta_ratio:.3f} (from {self.delta_samples} chunks)"
        return text


def learn_completion_model(session: Session, kb_id: int, model: str) -> CompletionModel:
    """Completion tokens per chunk token of the KB's checkpoints made by `model` with an LLM call:
    full ones (of the most recent schema version that has any) and delta ones apart."""

    def ratio(full: bool) -> tuple[float | None, int]:
        kind = ChunkCheckpoint.prompt_version > 0 if full else ChunkCheckpoint.prompt_version < 0
        base = (ChunkCheckpoint.kb_id == kb_id, ChunkCheckpoint.model == model,
                ChunkCheckpoint.completion_tokens > 0, kind)
        latest = session.scalar(select(func.max(ChunkCheckpoint.schema_version)).where(*base))
        if latest is None:
            return None, 0
        per_hash = (
            select(Chunk.content_hash, func.max(Chunk.token_count).label("tokens"))
            .join(Document, Document.id == Chunk.document_id)
            .where(Document.kb_id == kb_id)
            .group_by(Chunk.content_hash)
            .subquery()
        )
        row = session.execute(
            select(func.sum(ChunkCheckpoint.completion_tokens), func.sum(per_hash.c.tokens), func.count())
            .join(per_hash, per_hash.c.content_hash == ChunkCheckpoint.chunk_hash)
            .where(*base, ChunkCheckpoint.schema_version == latest)
        ).one()
        completion, chunk_tokens, samples = row
        if not samples or not chunk_tokens:
            return None, 0
        return float(completion) / float(chunk_tokens), int(samples)

    full_ratio, full_samples = ratio(True)
    delta_ratio, delta_samples = ratio(False)
    return CompletionModel(full_ratio, full_samples, delta_ratio, delta_samples)


@dataclass
class StrategyEstimate:
    """One strategy's share of a re-extraction."""

    strategy: str
    documents: int = 0
    chunks: int = 0
    cached_chunks: int = 0  # already checkpointed, or migrated without a call
    llm_calls: int = 0
    estimated_prompt_tokens: int = 0
    estimated_completion_tokens: int = 0
    estimated_cost_usd: float | None = 0.0


@dataclass(frozen=True)
class ReextractionEstimate:
    """The JSON of `lumikb reextract --dry-run`: totals, then per strategy."""

    kb: str
    schema_version: int
    model: str
    documents: int
    chunks: int
    cached_chunks: int
    llm_calls: int
    estimated_prompt_tokens: int
    estimated_completion_tokens: int
    estimated_cost_usd: float | None  # None: the model has no known price
    strategy: str = "auto"
    completion_model: str = DEFAULT_COMPLETION
    by_strategy: list[StrategyEstimate] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def estimate_reextraction(
    session: Session, kb: KnowledgeBase, schema: DomainSchema, schema_version: int, model: str,
    doc_ids: Sequence[str], strategy: StrategyOption = "auto",
) -> ReextractionEstimate:
    """Documents, chunks, calls still needed after checkpoints, and the estimated tokens and cost,
    per strategy (see the module docstring)."""
    chunks_by_doc: dict[str, list[Chunk]] = {}
    for batch in chunked(doc_ids, _BATCH):
        for chunk in session.scalars(select(Chunk).where(Chunk.document_id.in_(batch))):
            chunks_by_doc.setdefault(chunk.document_id, []).append(chunk)
    history = SchemaHistory(session, kb.id)
    plans = plan_documents(session, kb.id, schema_version, doc_ids, strategy, history)
    completion = learn_completion_model(session, kb.id, model)
    priced = is_priced(model)

    full_found = lookup(session, CheckpointKey(kb.id, schema_version, effective_prompt_version(schema), model),
                        {c.content_hash for chunks in chunks_by_doc.values() for c in chunks})
    derived_key = CheckpointKey(kb.id, schema_version, derived_prompt_version(schema), model)
    full_system = chat_prompt_tokens(build_messages(schema, "")[:1])
    sent: set[str] = set()  # content hashes already counted as a call
    groups: dict[str, StrategyEstimate] = {}

    def send(group: StrategyEstimate, chunk: Chunk, prompt: int, answer: int) -> None:
        if chunk.content_hash in sent:
            group.cached_chunks += 1  # identical text is sent once
            return
        sent.add(chunk.content_hash)
        group.llm_calls += 1
        group.estimated_prompt_tokens += prompt
        group.estimated_completion_tokens += answer

    def full_send(group: StrategyEstimate, chunk: Chunk) -> None:
        if chunk.content_hash in full_found:
            group.cached_chunks += 1
            return
        user = build_messages(schema, chunk.text)[1:]
        send(group, chunk, full_system + chat_prompt_tokens(user, priming=False), completion.full(chunk.token_count))

    for doc_id in doc_ids:
        plan = plans[doc_id]
        chunks = chunks_by_doc.get(doc_id, [])
        group = groups.setdefault(plan.strategy, StrategyEstimate(plan.strategy))
        group.documents += 1
        group.chunks += len(chunks)
        if plan.strategy == "full":
            for chunk in chunks:
                full_send(group, chunk)
            continue
        work = chunk_work(session, kb.id, plan, model, chunks, history)
        request = plan.delta
        derived_found = lookup(session, derived_key, work.migrated) if request is not None else {}
        for chunk in chunks:
            migrated = work.migrated.get(chunk.content_hash)
            if migrated is None:
                full_send(group, chunk)
            elif request is None or chunk.content_hash in derived_found:
                group.cached_chunks += 1
            else:
                known = [(e.name, e.type) for e in migrated.entities]
                messages = build_delta_messages(request.ask, chunk.text, known)
                send(group, chunk, chat_prompt_tokens(messages), completion.delta(chunk.token_count, request))

    by_strategy = [groups[s] for s in ("full", "delta", "graph-only", "none") if s in groups]
    for group in by_strategy:
        group.estimated_cost_usd = round(
            estimate_cost(model, group.estimated_prompt_tokens, group.estimated_completion_tokens), 6
        ) if priced else None
    prompt_tokens = sum(g.estimated_prompt_tokens for g in by_strategy)
    completion_tokens = sum(g.estimated_completion_tokens for g in by_strategy)
    return ReextractionEstimate(
        kb=kb.slug,
        schema_version=schema_version,
        model=model,
        documents=len(doc_ids),
        chunks=sum(g.chunks for g in by_strategy),
        cached_chunks=sum(g.cached_chunks for g in by_strategy),
        llm_calls=sum(g.llm_calls for g in by_strategy),
        estimated_prompt_tokens=prompt_tokens,
        estimated_completion_tokens=completion_tokens,
        estimated_cost_usd=round(estimate_cost(model, prompt_tokens, completion_tokens), 6) if priced else None,
        strategy=strategy,
        completion_model=completion.describe(),
        by_strategy=by_strategy,
    )
