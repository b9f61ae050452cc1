"""Extraction ahead: keeping the rate limit busy between a re-extraction job's runs (issue 13).

A job's runs each extract a batch and then write it; while one run ends and the next is dequeued,
launched and started, no call leaves unless another run of the job is extracting. So the step that
finishes its own batch last hands over like a relay runner: it goes on extracting chunks of the
job's *later* documents (their checkpoints only: no claim, no write, no outcome) until another step
of the job starts extracting its own batch, then stops and ends. The runs that later claim those
documents find their chunks checkpointed and write them; each document's outcome is still its own
run's, in the ledger and on its partition.

This module is the coordination, in Redis, per job:
- `OwnExtraction` registers a step while it extracts its own batch (renewed, so a crashed step
  stops counting after `REGISTRATION_TTL_S`), from its first LLM call (while it loads its
  documents and looks up their checkpoints, the step extracting ahead goes on) until its last few
  seconds of calls (`finish`: the next extraction ahead starts while its last answers are out);
- the ahead lock (`lumikb:job:<id>:ahead`): one step extracts ahead at a time, so the others end
  and free their worker processes for the next runs' steps; a step gives it up as soon as it is
  handed over, while its last calls are still out, so the next one can follow without a pause; a
  step that finds it no longer holds the lock (Redis restarted without its data) stops extracting
  ahead, as when handed over;
- `pick_ahead`: which documents to extract ahead: pending ones of the job from its *end*, each
  taken once (`SADD`), so two steps never extract the same document. A document taken is also
  marked *in progress* (`ahead_active_key`, scored by expiry) until its chunks are all settled;
  documents a step took but did not reach before it handed over are given back (`SREM`); a step
  that starts again after its process died frees what its previous incarnation held at once
  (`free_previous_incarnation`: same claimant), rather than after the marks and the lock expire;
- a run and a step extracting ahead never call for the same document at once, whatever the order
  (the Dekker pattern across PostgreSQL and Redis): `pick_ahead` marks a document in progress and
  *then* reads its ledger row, dropping it if a run has claimed it; a run claims its documents and
  *then* reads the marks (`in_progress_ahead`), and waits for those marked before it extracts them
  (`wait_for_ahead`), finding their chunks checkpointed. So extraction ahead may take any pending
  document, up to the job's last batches, and the job's calls run on to its last chunk.

What it costs: the calls made ahead are counted in the job's live spend (its budget) as they are
made, but a document served from those checkpoints shows 0 calls and $0 in its ledger row and
materialization (`cached_chunks` says how many chunks came from checkpoints). A document whose
calls fail ahead is extracted again by its own run, which reports the failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import cast

import redis
from sqlalchemy import select

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import JOB_KEY_TTL_S
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.models import Document, ExtractionRecord, ExtractionStatus
from lumikb_pipeline.db.session import session_scope

REGISTRATION_TTL_S = 30.0
ACTIVE_TTL_S = 30.0
LOCK_TTL_MS = 30_000
POLL_S = 0.2


def extracting_key(job_id: str) -> str:
    """Steps extracting their own batch now: a sorted set of claimants scored by expiry (epoch s)."""
    return f"lumikb:job:{job_id}:extracting"


def ahead_lock_key(job_id: str) -> str:
    return f"lumikb:job:{job_id}:ahead"


def ahead_documents_key(job_id: str) -> str:
    """The documents some step has taken to extract ahead (each once)."""
    return f"lumikb:job:{job_id}:ahead_documents"


def ahead_active_key(job_id: str) -> str:
    """The documents being extracted ahead now: a sorted set scored by expiry (epoch s), renewed by
    the step while it extracts them, so the marks of a step that crashed expire."""
    return f"lumikb:job:{job_id}:ahead_active"


def ahead_owners_key(job_id: str) -> str:
    """Which step (claimant) marked each document being extracted ahead: a hash, so that a step
    started again can free what its previous incarnation left marked (`free_previous_incarnation`)."""
    return f"lumikb:job:{job_id}:ahead_owners"


def mark_in_progress(client: redis.Redis, job_id: str, claimant: str, doc_ids: Sequence[str]) -> None:
    """Mark (or renew) `doc_ids` as being extracted ahead by `claimant` for the next `ACTIVE_TTL_S`."""
    if not doc_ids:
        return
    pipe = client.pipeline()
    pipe.zadd(ahead_active_key(job_id), dict.fromkeys(doc_ids, time.time() + ACTIVE_TTL_S))
    pipe.hset(ahead_owners_key(job_id), mapping=dict.fromkeys(doc_ids, claimant))
    for key in (ahead_active_key(job_id), ahead_owners_key(job_id)):
        pipe.expire(key, JOB_KEY_TTL_S)
    pipe.execute()


def unmark_in_progress(client: redis.Redis, job_id: str, doc_ids: Sequence[str]) -> None:
    if doc_ids:
        pipe = client.pipeline()
        pipe.zrem(ahead_active_key(job_id), *doc_ids)
        pipe.hdel(ahead_owners_key(job_id), *doc_ids)
        pipe.execute()


def free_previous_incarnation(client: redis.Redis, job_id: str, claimant: str) -> list[str]:
    """A step that starts again (Celery redelivered it after its process was killed, or its run's
    retry: the same claimant) frees at once what its previous incarnation held ahead, instead of
    leaving it until it expires (`ACTIVE_TTL_S`, `LOCK_TTL_MS`): the documents it was extracting
    ahead (their marks, for which the runs that claimed them wait, and their place in the job's
    taken set, so they can be taken again; their chunks already answered stay checkpointed), its
    registration as extracting its own batch, and the job's ahead lock. Returns the documents freed."""
    owners = cast(dict[str, str], client.hgetall(ahead_owners_key(job_id)))
    mine = sorted(doc_id for doc_id, owner in owners.items() if owner == claimant)
    pipe = client.pipeline()
    if mine:
        pipe.zrem(ahead_active_key(job_id), *mine)
        pipe.srem(ahead_documents_key(job_id), *mine)
        pipe.hdel(ahead_owners_key(job_id), *mine)
    pipe.zrem(extracting_key(job_id), claimant)
    pipe.execute()
    release_ahead_lock(client, job_id, claimant)
    return mine


def in_progress_ahead(client: redis.Redis, job_id: str, doc_ids: Sequence[str]) -> set[str]:
    """Those of `doc_ids` a step is extracting ahead now."""
    if not doc_ids:
        return set()
    now = time.time()
    scores = cast(list[float | None], client.zmscore(ahead_active_key(job_id), list(doc_ids)))
    return {doc_id for doc_id, score in zip(doc_ids, scores, strict=True) if score is not None and score > now}


def any_in_progress_ahead(client: redis.Redis, job_id: str, besides: Collection[str] = ()) -> bool:
    """Whether a step is extracting any of the job's documents ahead now, `besides` not counted."""
    members = cast(list[str], client.zrangebyscore(ahead_active_key(job_id), time.time(), "+inf"))
    return any(member not in besides for member in members)


def wait_for_ahead(client: redis.Redis, job_id: str, doc_ids: Sequence[str], stop: Callable[[], bool]) -> None:
    """Wait until no step extracts any of `doc_ids` ahead (their marks go as their chunks settle, or
    expire when the step died), or until `stop`. A Redis error ends the wait: the documents are
    then extracted as if nobody had taken them."""
    waiting = list(doc_ids)
    while waiting and not stop():
        try:
            waiting = sorted(in_progress_ahead(client, job_id, waiting))
        except redis.RedisError:
            return
        if waiting:
            time.sleep(POLL_S)


class OwnExtraction:
    """Registers a step as extracting its own batch of `job_id` while the context is open; with
    `lazy`, only from `start()` on (the step's first LLM call) until the context closes."""

    def __init__(self, client: redis.Redis, job_id: str, claimant: str, *, lazy: bool = False) -> None:
        self._client, self._key, self._claimant = client, extracting_key(job_id), claimant
        self._lazy = lazy
        self._closed = threading.Event()
        self._lock = threading.Lock()  # start() against __exit__
        self._thread = threading.Thread(target=self._renew, name=f"own-extraction-{claimant[:24]}", daemon=True)

    def __enter__(self) -> OwnExtraction:
        if not self._lazy:
            self.start()
        return self

    def start(self) -> None:
        """Register now (once) and keep the registration alive until the context closes."""
        with self._lock:
            if self._thread.is_alive() or self._closed.is_set():
                return
            try:
                self._register()
            except redis.RedisError:
                pass  # a Redis hiccup must not fail the step: the renewal registers it next round
            self._thread.start()

    def finish(self) -> None:
        """The step's own calls are nearly all made: it stops counting as extracting its own batch
        (from here on, or from `__exit__` at the latest), so that the job's next extraction ahead
        can start while its last answers are out."""
        with self._lock:
            self._closed.set()
        try:
            self._client.zrem(self._key, self._claimant)
        except redis.RedisError:
            pass  # the registration expires on its own

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _register(self) -> None:
        pipe = self._client.pipeline()
        pipe.zadd(self._key, {self._claimant: time.time() + REGISTRATION_TTL_S})
        pipe.expire(self._key, JOB_KEY_TTL_S)
        pipe.execute()

    def _renew(self) -> None:
        while not self._closed.wait(REGISTRATION_TTL_S / 3):
            try:
                self._register()
            except redis.RedisError:
                continue


def others_extracting(client: redis.Redis, job_id: str, claimant: str) -> bool:
    """Whether a step other than `claimant` is extracting its own batch of the job now."""
    members = cast(list[str], client.zrangebyscore(extracting_key(job_id), time.time(), "+inf"))
    return any(member != claimant for member in members)


def take_ahead_lock(client: redis.Redis, job_id: str, claimant: str) -> bool:
    """Take (or renew) the job's ahead lock for `claimant`; False when another step holds it."""
    if client.set(ahead_lock_key(job_id), claimant, nx=True, px=LOCK_TTL_MS):
        return True
    return renew_ahead_lock(client, job_id, claimant)


def renew_ahead_lock(client: redis.Redis, job_id: str, claimant: str) -> bool:
    """Renew the job's ahead lock held by `claimant`; False when it no longer holds it (Redis lost
    its data, or the lock expired while this step stalled): the step must then stop extracting
    ahead, since the documents it took are no longer marked taken."""
    key = ahead_lock_key(job_id)
    if client.get(key) != claimant:
        return False
    client.pexpire(key, LOCK_TTL_MS)
    return True


def release_ahead_lock(client: redis.Redis, job_id: str, claimant: str) -> None:
    key = ahead_lock_key(job_id)
    try:
        if client.get(key) == claimant:
            client.delete(key)
    except redis.RedisError:
        pass  # it expires on its own


def pick_ahead(
    settings: Settings, client: redis.Redis, job_id: str, claimant: str, schema_version: int, max_chunks: int
) -> list[str]:
    """Take up to `max_chunks` chunks' worth of the job's pending documents to extract ahead, from the
    job's end (in partition order). Each document is taken once, by one step, and is marked in
    progress by `claimant` until `unmark_in_progress`."""
    from sqlalchemy import func

    from lumikb_pipeline.db.models import Chunk

    with session_scope(settings.effective_database_url) as session:
        rows = session.execute(
            select(Document.id, func.count(Chunk.id))
            .join(ExtractionRecord, ExtractionRecord.document_id == Document.id)
            .outerjoin(Chunk, Chunk.document_id == Document.id)
            .where(ExtractionRecord.job_id == job_id, ExtractionRecord.schema_version == schema_version,
                   ExtractionRecord.status == ExtractionStatus.PENDING)
            .group_by(Document.id, Document.created_at)
            .order_by(Document.created_at, Document.id)
        ).tuples().all()
    candidates = list(reversed(rows))
    taken: list[str] = []
    chunks = 0
    key = ahead_documents_key(job_id)
    i = 0
    while i < len(candidates) and chunks < max_chunks:
        # Just enough documents for the chunks still wanted, each added to the job's set: only the
        # ones this call added are ours (another step may have taken some meanwhile).
        group: list[tuple[str, int]] = []
        wanted = chunks
        while i < len(candidates) and wanted < max_chunks:
            group.append(candidates[i])
            wanted += candidates[i][1]
            i += 1
        pipe = client.pipeline()
        for doc_id, _ in group:
            pipe.sadd(key, doc_id)
        pipe.expire(key, JOB_KEY_TTL_S)
        added = pipe.execute()[:-1]
        new = [(doc_id, count) for (doc_id, count), fresh in zip(group, added, strict=True) if fresh]
        # Marked in progress first, then the ledger read again: a run that claimed one of them
        # meanwhile extracts it itself (and one claiming it from now on waits for this step).
        mark_in_progress(client, job_id, claimant, [doc_id for doc_id, _ in new])
        claimed = _no_longer_pending(settings, [doc_id for doc_id, _ in new], job_id, schema_version)
        if claimed:
            unmark_in_progress(client, job_id, sorted(claimed))
            client.srem(key, *claimed)
        for doc_id, count in new:
            if doc_id not in claimed:
                taken.append(doc_id)
                chunks += count
    return taken


def _no_longer_pending(settings: Settings, doc_ids: Sequence[str], job_id: str, schema_version: int) -> set[str]:
    if not doc_ids:
        return set()
    with session_scope(settings.effective_database_url) as session:
        rows = ledger.records_for(session, doc_ids, schema_version)
        return {doc_id for doc_id in doc_ids if (row := rows.get(doc_id)) is None or row.job_id != job_id
                or row.status != ExtractionStatus.PENDING}

__all__ = [
    "OwnExtraction", "ahead_active_key", "ahead_documents_key", "ahead_lock_key", "ahead_owners_key",
    "extracting_key", "free_previous_incarnation", "in_progress_ahead", "mark_in_progress", "others_extracting",
    "pick_ahead", "release_ahead_lock", "renew_ahead_lock", "take_ahead_lock", "unmark_in_progress",
    "wait_for_ahead",
]
