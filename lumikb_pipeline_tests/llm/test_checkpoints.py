"""Chunk checkpoints on PostgreSQL and SQLite: keyed exactly, insert-or-ignore, batch lookups."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import func, select

from lumikb_pipeline.db.models import ChunkCheckpoint
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, DroppedItem, ExtractedEntity
from lumikb_pipeline.llm import checkpoints
from lumikb_pipeline.llm.checkpoints import CheckpointKey
from lumikb_pipeline_tests.llm.conftest import create_kb


@dataclass(frozen=True)
class Chunk:
    id: str
    content_hash: str


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def extraction(name: str = "Acme Corp") -> ChunkExtraction:
    return ChunkExtraction(
        chunk_id="c1", entities=[ExtractedEntity(name=name, type="Organization")],
        dropped=[DroppedItem(kind="entity", reason="unknown_type", detail="x")],
        llm_calls=2, prompt_tokens=100, completion_tokens=20, cost_usd=0.001,
    )


def test_a_saved_result_is_found_only_under_its_whole_key(db_url: str) -> None:
    kb = create_kb(db_url)
    other_kb = create_kb(db_url, "other")
    key = CheckpointKey(kb, 1, 100001, "openai/gpt-4o-mini")
    with session_scope(db_url) as session:
        assert checkpoints.save(session, key, sha("a"), extraction())

    with session_scope(db_url) as session:
        found = checkpoints.lookup(session, key, [sha("a"), sha("b")])
        misses = [
            checkpoints.lookup(session, other, [sha("a")])
            for other in (CheckpointKey(other_kb, 1, 100001, "openai/gpt-4o-mini"),
                          CheckpointKey(kb, 2, 100001, "openai/gpt-4o-mini"),
                          CheckpointKey(kb, 1, 100002, "openai/gpt-4o-mini"),
                          CheckpointKey(kb, 1, 100001, "lumikb/offline"))
        ]

    assert list(found) == [sha("a")]
    assert found[sha("a")].entities == extraction().entities and found[sha("a")].dropped == extraction().dropped
    assert found[sha("a")].prompt_tokens == 100 and found[sha("a")].cost_usd == 0.001
    assert misses == [{}, {}, {}, {}]


def test_saving_twice_keeps_the_first_result(db_url: str) -> None:
    key = CheckpointKey(create_kb(db_url), 1, 1, "m")
    with session_scope(db_url) as session:
        first = checkpoints.save(session, key, sha("a"), extraction("First"))
    with session_scope(db_url) as session:
        second = checkpoints.save(session, key, sha("a"), extraction("Second"))
    with session_scope(db_url) as session:
        found = checkpoints.lookup(session, key, [sha("a")])

    assert (first, second) == (True, False)
    assert found[sha("a")].entities[0].name == "First"


def test_concurrent_saves_of_the_same_chunk_all_succeed_and_store_one_row(db_url: str) -> None:
    key = CheckpointKey(create_kb(db_url), 1, 1, "m")

    def save(i: int) -> bool:
        with session_scope(db_url) as session:
            return checkpoints.save(session, key, sha("same"), extraction(f"Writer {i}"))

    with ThreadPoolExecutor(max_workers=8) as pool:
        stored = list(pool.map(save, range(16)))

    with session_scope(db_url) as session:
        rows = session.scalar(select(func.count()).select_from(ChunkCheckpoint))
    assert rows == 1 and stored.count(True) == 1


def test_many_chunks_are_looked_up_in_batches_and_pending_calls_are_counted(db_url: str) -> None:
    key = CheckpointKey(create_kb(db_url), 3, 1, "m")
    with session_scope(db_url) as session:
        for i in range(0, 2500, 10):
            checkpoints.save(session, key, sha(str(i)), extraction())
    hashes = [sha(str(i)) for i in range(2500)]

    with session_scope(db_url) as session:
        found = checkpoints.lookup(session, key, hashes)
    pending = checkpoints.count_pending_calls(db_url, key.kb_id, 3, 1, "m", hashes + hashes[:10])

    assert len(found) == 250
    assert pending == 2250  # one call per distinct hash without a checkpoint
    assert checkpoints.count_pending_calls(db_url, key.kb_id, 4, 1, "m", hashes) == 2500


def test_loaded_checkpoints_carry_each_chunks_own_id_in_order(db_url: str) -> None:
    kb = create_kb(db_url)
    key = CheckpointKey(kb, 1, 1, "m")
    with session_scope(db_url) as session:
        checkpoints.save(session, key, sha("x"), extraction("X"))
        checkpoints.save(session, key, sha("y"), extraction("Y"))
    chunks = [Chunk("c3", sha("y")), Chunk("c1", sha("x")), Chunk("c2", sha("nothing")), Chunk("c4", sha("x"))]

    with session_scope(db_url) as session:
        loaded = checkpoints.load_checkpoints(session, kb, 1, 1, "m", chunks)
        missing = checkpoints.missing_checkpoints(session, kb, 1, 1, "m", chunks)

    assert [(e.chunk_id, e.entities[0].name, e.from_checkpoint) for e in loaded] == [
        ("c3", "Y", True), ("c1", "X", True), ("c4", "X", True)
    ]
    assert missing == ["c2"]
