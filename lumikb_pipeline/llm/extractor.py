"""Chunk extraction: checkpoints first, then concurrent, globally rate-limited LLM calls.

`ChunkExtractor.extract` takes the chunks a worker holds and returns one outcome per chunk, in
order: a `ChunkExtraction` (validated; also stored as a checkpoint the moment it exists) or a
`ChunkFailure` (with a reason the user can act on, never a secret). Nothing else escapes.

How one call to `extract` runs:

1. Chunks are grouped by content hash (identical chunks cost one call) and looked up in the
   checkpoints in one batch; hits are answered from the database without touching Redis.
2. Up to `concurrency` tasks (default: the global in-flight cap) take the remaining chunks. Each
   call waits for a lease and its rate slot (`RateLimiter.slot`), so a single worker can keep the
   whole global limit busy even when each call takes seconds, and many workers never exceed it.
3. 429s and 5xx are retried with exponential backoff and jitter (tenacity), never sooner than the
   provider's `Retry-After`; a 429 also slows the shared limiter down for everyone. Unusable
   answers are retried too. 429s have their own, larger budget: they are not billed and say
   nothing about the chunk. LiteLLM's own retries are off (`num_retries=0`, `max_retries=0`) so
   every request that leaves the process went through the limiter.
4. `should_stop` is asked right before every call; once it says True no call starts, and the
   chunks not done are returned as `ChunkFailure(reason="cancelled")`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import litellm
import redis.asyncio as aioredis

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.scrub import install as install_log_scrubbing
from lumikb_pipeline.core.scrub import register_secret, scrub
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure, ChunkInput
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.domain.schema_diff import DeltaRequest
from lumikb_pipeline.infra.redis_client import redis_url as configured_redis_url
from lumikb_pipeline.infra.redis_client import shared_async_client
from lumikb_pipeline.llm import checkpoints, send_gate
from lumikb_pipeline.llm.client import (
    CANCELLED,
    ChunkCaller,
    ChunkOutcome,
    format_kwargs,
    uses_openai_sdk,
    warm_up_litellm,
)
from lumikb_pipeline.llm.event_loop import run_in_loop_thread
from lumikb_pipeline.llm.offline import register_offline_model
from lumikb_pipeline.llm.prompt import derived_prompt_version, effective_prompt_version
from lumikb_pipeline.llm.rate_limit import RateLimiter
from lumikb_pipeline.llm.retry import REASON_CHARS, RetryPolicy

log = logging.getLogger(__name__)

# The OpenAI SDK's typed dicts make pydantic warn once per process on LiteLLM's first call; it is
# about those SDK types, says nothing to our users and would land in every worker's log.
warnings.filterwarnings("ignore", message=r"Items .* are using the `ReadOnly` qualifier", category=UserWarning)

_SLOW_SHOULD_STOP_S = 0.005
# How long a paid-for result is kept trying to be stored while the app database is away (a restart,
# a failover), backing off up to `CHECKPOINT_BACKOFF_MAX_S` between tries, before the chunk fails.
CHECKPOINT_SAVE_WINDOW_S = 120.0
CHECKPOINT_BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class DeltaTask:
    """A `delta` extraction (schema evolution): ask only for `request`'s added types, with each
    chunk's migrated previous extraction (`bases`, by content hash) as known entities, and merge the
    answer into it. Results are checkpointed under the derived key (`prompt.derived_prompt_version`),
    never under a full extraction's."""

    request: DeltaRequest
    bases: Mapping[str, ChunkExtraction]



def _protect_logs(secret: str | None) -> None:
    """Scrub the API key (and key-shaped tokens) from every log record, LiteLLM's included."""
    register_secret(secret)
    install_log_scrubbing()


def _quiet_per_call_logs() -> None:
    """LiteLLM and httpx log a line at INFO for every call: at 20 calls/s, 40 lines a second, which a
    Celery worker writes twice (LiteLLM prints to stderr, which Celery logs again), from the event
    loop that prepares the calls. The extractor logs one line per batch instead; their warnings and
    errors still show, and `LITELLM_LOG` set by an operator (e.g. `DEBUG`) is left as it is."""
    if "LITELLM_LOG" not in os.environ:
        logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    for http_client in ("httpx", "httpx2"):  # httpx2: the OpenAI SDK's, which LiteLLM drives
        logging.getLogger(http_client).setLevel(logging.WARNING)


class ChunkExtractor:
    """Extracts chunks with the configured model, through the shared limiter and the checkpoints.

    One instance can serve many `extract` calls, also from different event loops; the limiter lives
    for one call, the Redis pool is the event loop's (`infra.redis_client.shared_async_client`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        database_url: str | None = None,
        redis: str | aioredis.Redis | None = None,
        model: str | None = None,
        concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        limiter_options: dict[str, Any] | None = None,
    ) -> None:
        """`database_url` and `redis` (a URL or an asyncio client) default to the configured ones;
        `concurrency` (calls this process runs at once) defaults to the global in-flight cap."""
        self.settings = settings
        self.model = model or settings.llm_model
        self.database_url = database_url or settings.effective_database_url
        self._redis = redis
        self.concurrency = concurrency or settings.max_in_flight
        self.retry_policy = retry or RetryPolicy.from_settings(settings)
        self.checkpoint_save_window_s = CHECKPOINT_SAVE_WINDOW_S
        self.limiter_options = dict(limiter_options or {})
        self.rate_limit = settings.rate_limit_for(self.model)
        self._api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        self._secrets = (self._api_key,) if self._api_key else ()
        self._slow_stop_warned = False
        # For diagnosis: rate slots given up because a call could not leave on time (see rate_limit),
        # and how long after its slot the latest sent request had been written.
        self.missed_by: Counter[str] = Counter()
        self.max_send_late_s = 0.0
        litellm.suppress_debug_info = True  # its "Give Feedback" banner on every error is noise in job logs
        register_offline_model()
        _protect_logs(self._api_key)
        _quiet_per_call_logs()

    # --- public API -----------------------------------------------------------------------------

    @property
    def missed_slots(self) -> int:
        """Rate slots given up so far (a call could not leave on time)."""
        return sum(self.missed_by.values())

    def warm_up(self) -> None:
        """Do the slow first-time work now, before calls are timed (`extract` warms LiteLLM too).

        Worth calling when a worker starts: LiteLLM's first call, the first database query and
        the first model lookup each spend tens to hundreds of milliseconds of CPU, and calls due
        meanwhile, in this process or in others on the same machine, would leave late and together.
        """
        run_in_loop_thread(warm_up_litellm(self.model))
        if uses_openai_sdk(self.model):
            send_gate.warm_up_sender()
        format_kwargs(self.model, None)
        self._lookup(checkpoints.CheckpointKey(0, 0, 0, self.model), ["0" * 64])

    def extract_sync(
        self,
        kb_id: int,
        schema_version: int,
        schema: DomainSchema,
        chunks: Sequence[ChunkInput],
        should_stop: Callable[[], bool] | None = None,
        on_result: Callable[[ChunkOutcome], None] | None = None,
        delta: DeltaTask | None = None,
        wind_down: Callable[[], bool] | None = None,
        on_calls_start: Callable[[], None] | None = None,
    ) -> list[ChunkOutcome]:
        """`extract` for callers that are not async (Dagster ops, Celery tasks, the CLI)."""
        if isinstance(self._redis, aioredis.Redis):
            raise TypeError("extract_sync needs a Redis URL, not an asyncio client bound to another loop")
        return run_in_loop_thread(
            self.extract(kb_id, schema_version, schema, chunks, should_stop, on_result, delta, wind_down,
                         on_calls_start)
        )

    async def extract(
        self,
        kb_id: int,
        schema_version: int,
        schema: DomainSchema,
        chunks: Sequence[ChunkInput],
        should_stop: Callable[[], bool] | None = None,
        on_result: Callable[[ChunkOutcome], None] | None = None,
        delta: DeltaTask | None = None,
        wind_down: Callable[[], bool] | None = None,
        on_calls_start: Callable[[], None] | None = None,
    ) -> list[ChunkOutcome]:
        """Extract `chunks` of KB `kb_id` at `schema_version` (whose content is `schema`).

        Returns one outcome per chunk, in order. `should_stop` is called right before every LLM
        call, on the event loop, so it must be cheap (read a flag that something else refreshes);
        once it returns True no new call starts. `on_result` sees each outcome as it is known
        (for progress and spend tracking). With `delta`, each chunk's result is its base merged
        with the answer to a delta prompt (every chunk must have a base). Once `wind_down` (also
        cheap, asked before each chunk is started) returns True, no further chunk is started, but the
        chunks already started go on to their calls: their rate slots may be reserved already, and a
        slot given up is a slot nobody uses. The chunks not started fail as `cancelled`.
        `on_calls_start` is called (in a thread) once the checkpoints are looked up, right before
        the first LLM call is prepared, and only when some chunk needs one.
        """
        started = time.monotonic()
        prompt_version = effective_prompt_version(schema) if delta is None else derived_prompt_version(schema)
        key = checkpoints.CheckpointKey(kb_id, schema_version, prompt_version, self.model)
        groups: dict[str, list[ChunkInput]] = {}
        for chunk in chunks:
            groups.setdefault(chunk.content_hash, []).append(chunk)
        outcomes: dict[str, ChunkOutcome] = {}

        def settle(content_hash: str, outcome: ChunkOutcome) -> None:
            for i, chunk in enumerate(groups[content_hash]):
                # Only the first chunk of identical ones carries the call's usage; the others reused it.
                if i == 0:
                    result = outcome.model_copy(update={"chunk_id": chunk.id})
                elif isinstance(outcome, ChunkExtraction):
                    result = outcome.model_copy(update={
                        "chunk_id": chunk.id, "from_checkpoint": True, "llm_calls": 0,
                        "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                    })
                else:
                    result = outcome.model_copy(update={"chunk_id": chunk.id, "llm_calls": 0})
                outcomes[chunk.id] = result
                if on_result is not None:
                    on_result(result)

        try:
            stored = await asyncio.to_thread(self._lookup, key, list(groups)) if groups else {}
        except Exception as exc:
            return self._fail_all(chunks, "checkpoint_lookup_failed: the app database did not answer; check "
                                  f"LUMIKB_DATABASE_URL ({type(exc).__name__}: {exc})", on_result)
        for content_hash, extraction in stored.items():
            # Served from a checkpoint: this run spent nothing on it.
            settle(content_hash, extraction.model_copy(update={
                "from_checkpoint": True, "llm_calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
            }))
        todo = [h for h in groups if h not in stored]
        if todo:
            if on_calls_start is not None:
                await asyncio.to_thread(on_calls_start)
            try:
                await self._extract_missing(key, schema, todo, groups, should_stop, settle, delta, wind_down)
            except Exception as exc:
                # A safety net (e.g. an unusable Redis URL): per-chunk errors are handled inside.
                log.error("extraction of KB %s stopped: %s", kb_id,
                          scrub("".join(traceback.format_exception(exc)), self._secrets))
                unsettled = [chunk for chunk in chunks if chunk.id not in outcomes]
                for result in self._fail_all(unsettled, f"unexpected_error: {type(exc).__name__}: {exc}", on_result):
                    outcomes[result.chunk_id] = result
        results = [outcomes[chunk.id] for chunk in chunks]
        log.info(
            "extracted %d chunks of KB %s at schema version %d with %s: %d from checkpoints, %d LLM calls, "
            "%d failed, %.1f s; rate slots given up so far %d%s, latest request written after its slot %.0f ms",
            len(results), kb_id, schema_version, self.model,
            sum(isinstance(r, ChunkExtraction) and r.from_checkpoint for r in results),
            sum(r.llm_calls for r in results), sum(isinstance(r, ChunkFailure) for r in results),
            time.monotonic() - started, self.missed_slots,
            f" ({', '.join(f'{where}: {n}' for where, n in self.missed_by.most_common())})" if self.missed_by else "",
            self.max_send_late_s * 1000,
        )
        return results

    # --- internals ------------------------------------------------------------------------------

    def _fail_all(self, chunks: Sequence[ChunkInput], reason: str,
                  on_result: Callable[[ChunkOutcome], None] | None) -> list[ChunkOutcome]:
        reason = scrub(reason, self._secrets)[:REASON_CHARS]
        log.error("%d chunks failed: %s", len(chunks), reason)
        failures: list[ChunkOutcome] = [ChunkFailure(chunk_id=chunk.id, reason=reason) for chunk in chunks]
        if on_result is not None:
            for failure in failures:
                on_result(failure)
        return failures

    def _lookup(self, key: checkpoints.CheckpointKey, hashes: list[str]) -> dict[str, ChunkExtraction]:
        with session_scope(self.database_url) as session:
            return checkpoints.lookup(session, key, hashes)

    def _save(self, key: checkpoints.CheckpointKey, content_hash: str, extraction: ChunkExtraction) -> None:
        with session_scope(self.database_url) as session:
            checkpoints.save(session, key, content_hash, extraction)

    async def _extract_missing(
        self,
        key: checkpoints.CheckpointKey,
        schema: DomainSchema,
        todo: list[str],
        groups: dict[str, list[ChunkInput]],
        should_stop: Callable[[], bool] | None,
        settle: Callable[[str, ChunkOutcome], None],
        delta: DeltaTask | None = None,
        wind_down: Callable[[], bool] | None = None,
    ) -> None:
        if isinstance(self._redis, aioredis.Redis):
            client = self._redis
        else:
            # Resolving the URL may start the embedded Redis (a subprocess): not on the event loop.
            url: str = self._redis if isinstance(self._redis, str) else await asyncio.to_thread(
                configured_redis_url, self.settings
            )
            # The loop's one pool (not a client per step: connections would come and go with each).
            client = shared_async_client(url, self.concurrency + 8)
        limiter = RateLimiter(client, self.model, self.rate_limit, self.settings.max_in_flight, **self.limiter_options)
        await warm_up_litellm(self.model)
        checked_stop = (lambda: self._should_stop(should_stop)) if should_stop is not None else None
        run = ChunkCaller(
            settings=self.settings, model=self.model, api_key=self._api_key, concurrency=self.concurrency,
            retry_policy=self.retry_policy, schema=schema, limiter=limiter, should_stop=checked_stop,
            delta=None if delta is None else (delta.request, delta.bases),
        )
        queue: asyncio.Queue[str] = asyncio.Queue()
        for content_hash in todo:
            queue.put_nowait(content_hash)

        async def worker() -> None:
            while True:
                if wind_down is not None and wind_down():
                    return
                try:
                    content_hash = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcome = await run.extract_one(groups[content_hash][0])
                if isinstance(outcome, ChunkExtraction):
                    outcome = await self._checkpoint(key, content_hash, outcome)
                settle(content_hash, outcome)

        tasks: list[asyncio.Task[None]] = []
        try:
            # Workers start one by one, half an interval apart: started all at once, their first
            # Redis round-trips and prompt building would hold the event loop just when the first
            # slots are due, and those calls would leave late and together.
            ramp_s = min(limiter.interval_s / 2, 0.05)
            for i in range(min(self.concurrency, len(todo))):
                if i:
                    await asyncio.sleep(ramp_s)
                if queue.empty():
                    break
                tasks.append(asyncio.create_task(worker()))
            await asyncio.gather(*tasks)
            while not queue.empty():  # wound down before these were started
                content_hash = queue.get_nowait()
                settle(content_hash, ChunkFailure(chunk_id=groups[content_hash][0].id, reason=CANCELLED))
        finally:
            for task in tasks:
                task.cancel()
            self.missed_by.update(limiter.missed_by)
            self.max_send_late_s = max(self.max_send_late_s, run.max_send_late_s)
            await limiter.close()
            await run.close()

    async def _checkpoint(self, key: checkpoints.CheckpointKey, content_hash: str,
                          extraction: ChunkExtraction) -> ChunkOutcome:
        # The result was paid for: try hard to keep it (a database restart is waited out, for up to
        # `checkpoint_save_window_s`), but a chunk whose result cannot be stored is a failure,
        # because the graph is written from the checkpoints.
        error = ""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self._save, key, content_hash, extraction)
                return extraction
            except Exception as exc:
                error = scrub(f"{type(exc).__name__}: {exc}", self._secrets)[:REASON_CHARS]
                log.warning("could not store the checkpoint of chunk %s (attempt %d): %s",
                            extraction.chunk_id, attempt + 1, error)
            left = self.checkpoint_save_window_s - (time.monotonic() - started)
            if left <= 0:
                break
            await asyncio.sleep(min(CHECKPOINT_BACKOFF_MAX_S, 0.25 * 2 ** attempt, left))
            attempt += 1
        return ChunkFailure(
            chunk_id=extraction.chunk_id, llm_calls=extraction.llm_calls,
            reason=f"checkpoint_not_saved: the chunk was extracted but its result could not be stored in the "
                   f"app database for {time.monotonic() - started:.0f} s ({attempt + 1} tries; {error}); check "
                   f"LUMIKB_DATABASE_URL and retry",
        )

    def _should_stop(self, should_stop: Callable[[], bool]) -> bool:
        started = time.perf_counter()
        answer = bool(should_stop())
        elapsed = time.perf_counter() - started
        if elapsed > _SLOW_SHOULD_STOP_S and not self._slow_stop_warned:
            self._slow_stop_warned = True
            log.warning("should_stop took %.0f ms; it runs on the event loop before every LLM call and delays "
                        "the others: make it read a flag that is refreshed elsewhere", elapsed * 1000)
        return answer


__all__ = ["ChunkExtractor", "ChunkInput", "ChunkOutcome", "DeltaTask", "RetryPolicy"]
