"""Chunk checkpoints: the validated LLM result of a chunk, stored as soon as it exists.

The key is (KB, chunk content hash, schema version, effective prompt version, model), so a chunk
whose text, schema, prompt and model are unchanged is never paid for twice, whichever document,
job or worker asks for it, and a crash costs at most the calls in flight. Writes are
insert-or-ignore on the key's unique constraint: two workers that extract the same chunk at once
both succeed and the first result stays.

The functions here are synchronous (SQLAlchemy sessions); the extractor runs them in a thread so
the event loop that times the LLM calls never blocks on the database.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lumikb_pipeline.db.models import ChunkCheckpoint
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction

# Bound parameters per lookup query: far below PostgreSQL's 65535 and SQLite's 32766.
_LOOKUP_BATCH = 1000
_KEY_COLUMNS = ["kb_id", "chunk_hash", "schema_version", "prompt_version", "model"]


class HasContentHash(Protocol):
    """Anything with a chunk id and the hash of its text (e.g. `ChunkInput`)."""

    @property
    def id(self) -> str: ...

    @property
    def content_hash(self) -> str: ...


@dataclass(frozen=True)
class CheckpointKey:
    """Everything but the chunk hash that identifies a checkpoint."""

    kb_id: int
    schema_version: int
    prompt_version: int
    model: str


def lookup(session: Session, key: CheckpointKey, hashes: Iterable[str]) -> dict[str, ChunkExtraction]:
    """The stored extractions of the given chunk hashes, by hash (missing hashes have none).

    The returned `chunk_id` is empty: a hash may stand for several chunks; see `load_checkpoints`.
    """
    wanted = sorted(set(hashes))
    found: dict[str, ChunkExtraction] = {}
    for start in range(0, len(wanted), _LOOKUP_BATCH):
        rows = session.execute(
            select(ChunkCheckpoint.chunk_hash, ChunkCheckpoint.result).where(
                ChunkCheckpoint.kb_id == key.kb_id,
                ChunkCheckpoint.schema_version == key.schema_version,
                ChunkCheckpoint.prompt_version == key.prompt_version,
                ChunkCheckpoint.model == key.model,
                ChunkCheckpoint.chunk_hash.in_(wanted[start:start + _LOOKUP_BATCH]),
            )
        )
        for chunk_hash, result in rows:
            found[chunk_hash] = ChunkExtraction.model_validate({**result, "chunk_id": ""})
    return found


def save(session: Session, key: CheckpointKey, chunk_hash: str, extraction: ChunkExtraction) -> bool:
    """Store a chunk's validated extraction unless one exists for the same key; True if stored.

    Safe under concurrency: the insert does nothing on a conflict with the unique key, on
    PostgreSQL and SQLite alike.
    """
    values = {
        "kb_id": key.kb_id,
        "chunk_hash": chunk_hash,
        "schema_version": key.schema_version,
        "prompt_version": key.prompt_version,
        "model": key.model,
        # The stored result is the chunk's content's result: no chunk id, no "from checkpoint" flag.
        "result": extraction.model_dump(mode="json", exclude={"chunk_id", "from_checkpoint"}),
        "prompt_tokens": extraction.prompt_tokens,
        "completion_tokens": extraction.completion_tokens,
        "cost_usd": extraction.cost_usd,
    }
    dialect = session.get_bind().dialect.name
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(ChunkCheckpoint).values(**values).on_conflict_do_nothing(
            index_elements=_KEY_COLUMNS
        )
    elif dialect == "sqlite":
        statement = sqlite.insert(ChunkCheckpoint).values(**values).on_conflict_do_nothing(index_elements=_KEY_COLUMNS)
    else:
        raise NotImplementedError(f"chunk checkpoints support PostgreSQL and SQLite, not {dialect}")
    # RETURNING tells whether this statement inserted; rowcount is not reliable through the ORM session.
    return session.execute(statement.returning(ChunkCheckpoint.id)).first() is not None


def load_checkpoints(
    session: Session,
    kb_id: int,
    schema_version: int,
    prompt_version: int,
    model: str,
    chunks: Sequence[HasContentHash],
) -> list[ChunkExtraction]:
    """The checkpointed extractions of `chunks`, in their order, each under its own chunk id.

    Chunks without a checkpoint are left out; compare lengths (or use `missing_checkpoints`) when
    every chunk must have one. `from_checkpoint` is True and the usage figures are those of the
    call that produced the result.
    """
    found = lookup(session, CheckpointKey(kb_id, schema_version, prompt_version, model),
                   (c.content_hash for c in chunks))
    return [
        found[c.content_hash].model_copy(update={"chunk_id": c.id, "from_checkpoint": True})
        for c in chunks if c.content_hash in found
    ]


def missing_checkpoints(
    session: Session,
    kb_id: int,
    schema_version: int,
    prompt_version: int,
    model: str,
    chunks: Sequence[HasContentHash],
) -> list[str]:
    """The ids of the chunks that have no checkpoint (they would be sent to the LLM)."""
    found = lookup(session, CheckpointKey(kb_id, schema_version, prompt_version, model),
                   (c.content_hash for c in chunks))
    return [c.id for c in chunks if c.content_hash not in found]


def count_pending_calls(
    database_url: str,
    kb_id: int,
    schema_version: int,
    prompt_version: int,
    model: str,
    chunk_hashes: Iterable[str],
) -> int:
    """How many LLM calls extracting these chunks still needs (for `--dry-run`).

    One call per distinct content hash without a checkpoint: the extractor sends identical chunks
    once. Retries are not counted (they cannot be known in advance).
    """
    distinct = set(chunk_hashes)
    if not distinct:
        return 0
    with session_scope(database_url) as session:
        found = lookup(session, CheckpointKey(kb_id, schema_version, prompt_version, model), distinct)
    return len(distinct) - len(found)
