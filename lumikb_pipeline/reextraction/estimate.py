"""What a re-extraction would cost, before it starts (`lumikb reextract --dry-run`).

Calls are counted exactly: one per distinct chunk content without a checkpoint at the target
schema version, prompt version and model (retries cannot be known in advance). Tokens are
estimated: the prompt is measured (the schema's instructions plus the chunk), the answer is
assumed to be about half the chunk's length plus a fixed envelope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lumikb_pipeline.db.models import Chunk, KnowledgeBase
from lumikb_pipeline.domain.batching import chunked
from lumikb_pipeline.domain.chunking import count_tokens
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm.checkpoints import CheckpointKey, lookup
from lumikb_pipeline.llm.cost import estimate_cost, is_priced
from lumikb_pipeline.llm.prompt import build_messages, effective_prompt_version

ANSWER_ENVELOPE_TOKENS = 40


def estimated_answer_tokens(chunk_tokens: int) -> int:
    """The assumed size of the model's answer for a chunk of `chunk_tokens` tokens."""
    return ANSWER_ENVELOPE_TOKENS + chunk_tokens // 2


@dataclass(frozen=True)
class ReextractionEstimate:
    """The JSON of `lumikb reextract --dry-run`."""

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

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def estimate_reextraction(
    session: Session, kb: KnowledgeBase, schema: DomainSchema, schema_version: int, model: str, doc_ids: Sequence[str]
) -> ReextractionEstimate:
    """Documents, chunks, calls still needed after checkpoints, and the estimated tokens and cost."""
    chunks: list[tuple[str, int]] = []
    for batch in chunked(doc_ids, 1000):
        rows = session.execute(select(Chunk.content_hash, Chunk.token_count).where(Chunk.document_id.in_(batch)))
        chunks.extend(rows.tuples())
    key = CheckpointKey(kb.id, schema_version, effective_prompt_version(schema), model)
    found = lookup(session, key, {content_hash for content_hash, _ in chunks})
    to_send = {content_hash: tokens for content_hash, tokens in chunks if content_hash not in found}
    instructions = sum(count_tokens(message["content"]) for message in build_messages(schema, ""))
    prompt_tokens = sum(instructions + tokens for tokens in to_send.values())
    completion_tokens = sum(estimated_answer_tokens(tokens) for tokens in to_send.values())
    return ReextractionEstimate(
        kb=kb.slug,
        schema_version=schema_version,
        model=model,
        documents=len(doc_ids),
        chunks=len(chunks),
        cached_chunks=sum(1 for content_hash, _ in chunks if content_hash in found),
        llm_calls=len(to_send),
        estimated_prompt_tokens=prompt_tokens,
        estimated_completion_tokens=completion_tokens,
        estimated_cost_usd=round(estimate_cost(model, prompt_tokens, completion_tokens), 6)
        if is_priced(model) else None,
    )
