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
import gc
import logging
import os
import random
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx2
import litellm
import redis.asyncio as aioredis
from openai import AsyncOpenAI
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState

from lumikb_pipeline.config import RateLimit, Settings, parse_model_rate_limits
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.domain.schema_diff import DeltaRequest, merge_delta
from lumikb_pipeline.llm import checkpoints, send_gate
from lumikb_pipeline.llm.cost import response_cost
from lumikb_pipeline.llm.offline import OFFLINE_MODEL, register_offline_model
from lumikb_pipeline.llm.parse import ParsedAnswer, UnusableAnswer, answer_format, parse_answer
from lumikb_pipeline.llm.prompt import (
    build_delta_messages,
    build_messages,
    derived_prompt_version,
    effective_prompt_version,
)
from lumikb_pipeline.llm.rate_limit import RateLimiter
from lumikb_pipeline.llm.send_gate import GatedTransport, SendGate, current_gate
from lumikb_pipeline.redis_client import redis_url as configured_redis_url
from lumikb_pipeline.scrub import scrub

log = logging.getLogger(__name__)

# The OpenAI SDK's typed dicts make pydantic warn once per process on LiteLLM's first call; it is
# about those SDK types, says nothing to our users and would land in every worker's log.
warnings.filterwarnings("ignore", message=r"Items .* are using the `ReadOnly` qualifier", category=UserWarning)

ChunkOutcome = ChunkExtraction | ChunkFailure
CANCELLED = "cancelled"
_REASON_CHARS = 500
_SLOW_SHOULD_STOP_S = 0.005


@dataclass(frozen=True)
class ChunkInput:
    """One chunk to extract: its id, its text and the hash of its text (the checkpoint key)."""

    id: str
    text: str
    content_hash: str


@dataclass(frozen=True)
class DeltaTask:
    """A `delta` extraction (schema evolution): ask only for `request`'s added types, with each
    chunk's migrated previous extraction (`bases`, by content hash) as known entities, and merge the
    answer into it. Results are checkpointed under the derived key (`prompt.derived_prompt_version`),
    never under a full extraction's."""

    request: DeltaRequest
    bases: Mapping[str, ChunkExtraction]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one chunk is retried."""

    max_attempts: int = 6  # calls that failed for a reason of their own: 5xx, timeout, unusable answer
    max_rate_limited: int = 30  # 429s (not billed, no fault of the chunk's): a separate, larger budget
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 600.0  # a longer Retry-After is a failure, not a wait

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy for `LUMIKB_LLM_MAX_ATTEMPTS` (429s get five times as many)."""
        return cls(max_attempts=settings.llm_max_attempts, max_rate_limited=max(10, 5 * settings.llm_max_attempts))


class _Cancelled(Exception):
    """should_stop said stop before a call."""


class _RetryAfterTooLong(Exception):
    pass


@dataclass
class _Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class _Budget:
    """One chunk's retry state, fed to tenacity's retry/wait/stop hooks (called in that order)."""

    policy: RetryPolicy
    failures: int = 0
    rate_limited: int = 0
    last_retry_after: float | None = None
    last_kind: str = ""

    def retry(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return False
        kind = _classify(exc)
        self.last_kind = kind
        self.last_retry_after = _retry_after_s(exc)
        if kind == "rate_limited":
            self.rate_limited += 1
        elif kind in ("transient", "unusable"):
            self.failures += 1
        else:
            return False
        return True

    def wait(self, state: RetryCallState) -> float:
        if self.last_kind == "unusable":
            # The answer was bad, the service is fine: go again (through the limiter) at once.
            return 0.0
        retries = self.rate_limited if self.last_kind == "rate_limited" else self.failures
        backoff = min(self.policy.backoff_max_s, self.policy.backoff_base_s * 2 ** (retries - 1))
        jittered = random.uniform(backoff / 2, backoff)
        if self.last_retry_after is not None:
            if self.last_retry_after > self.policy.max_retry_after_s:
                raise _RetryAfterTooLong(f"the provider asked to retry after {self.last_retry_after:.0f} s")
            # Never sooner than Retry-After; a little later than it, so retries told the same
            # Retry-After do not all come back in the same instant.
            return max(jittered, self.last_retry_after + random.uniform(0.0, 0.1))
        return jittered

    def stop(self, _state: RetryCallState) -> bool:
        return self.failures >= self.policy.max_attempts or self.rate_limited >= self.policy.max_rate_limited


def _classify(exc: BaseException) -> str:
    """rate_limited | transient | unusable | permanent."""
    if isinstance(exc, UnusableAnswer):
        return "unusable"
    if isinstance(exc, litellm.RateLimitError):
        return "rate_limited"
    if isinstance(exc, litellm.ContextWindowExceededError | litellm.ContentPolicyViolationError):
        return "permanent"
    if isinstance(exc, litellm.Timeout | litellm.APIConnectionError | RedisError | asyncio.TimeoutError):
        return "transient"
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        if status == 429:
            return "rate_limited"
        if status >= 500 or status in (408, 409):
            return "transient"
    return "permanent"


def _headers(exc: BaseException) -> Any:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    return headers


def _retry_after_s(exc: BaseException) -> float | None:
    """The provider's Retry-After of a failed call, in seconds (retry-after-ms wins: it is exact)."""
    headers = _headers(exc)
    if headers is None:
        return None
    try:
        value = headers.get("retry-after-ms")
        if value is not None:
            return max(0.0, float(value) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, AttributeError):
        return None


class _SecretFilter(logging.Filter):
    """Scrubs the configured API key (and key-shaped tokens) from LiteLLM's log records."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message, tuple(self.secrets))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # The handler would format the traceback later, with the key in the exception's message.
            text = "".join(traceback.format_exception(record.exc_info[1]))
            record.msg = f"{record.msg}\n{scrub(text, tuple(self.secrets))}"
            record.exc_info, record.exc_text = None, None
        return True


_secret_filter = _SecretFilter()
_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "openai")


def _protect_logs(secret: str | None) -> None:
    if secret:
        _secret_filter.secrets.add(secret)
    for name in _LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        if _secret_filter not in logger.filters:
            logger.addFilter(_secret_filter)


# The offline model runs in-process and protects no paid API: unless LUMIKB_LLM_RATE_LIMITS names it,
# it gets this limit instead of LUMIKB_LLM_RATE_LIMIT, so the demo is not slowed to 10 chunks/s.
OFFLINE_RATE_LIMIT = RateLimit(1000.0, 1.0)


def rate_limit_for(settings: Settings, model: str) -> RateLimit:
    """The global limit that applies to `model` (see `OFFLINE_RATE_LIMIT` for the offline model)."""
    if model == OFFLINE_MODEL and model not in parse_model_rate_limits(settings.llm_rate_limits):
        return OFFLINE_RATE_LIMIT
    return settings.rate_limit_for(model)


class ChunkExtractor:
    """Extracts chunks with the configured model, through the shared limiter and the checkpoints.

    One instance can serve many `extract` calls, also from different event loops (`extract_sync`
    runs each in its own); the Redis connection and the limiter live for one call.
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
        self.limiter_options = dict(limiter_options or {})
        self.rate_limit = rate_limit_for(settings, self.model)
        self._api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        self._secrets = (self._api_key,) if self._api_key else ()
        self._slow_stop_warned = False
        # For diagnosis: rate slots given up because a call could not leave on time (see rate_limit),
        # and the latest that a sent request left after its slot.
        self.missed_slots = 0
        self.max_send_late_s = 0.0
        litellm.suppress_debug_info = True  # its "Give Feedback" banner on every error is noise in job logs
        register_offline_model()
        _protect_logs(self._api_key)

    # --- public API -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Do the slow first-time work now, before calls are timed (`extract` warms LiteLLM too).

        Worth calling when a worker starts: LiteLLM's first call, the first database query and
        the first model lookup each spend tens to hundreds of milliseconds of CPU, and calls due
        meanwhile, in this process or in others on the same machine, would leave late and together.
        """
        _run_in_loop_thread(_warm_up(self.model))
        if _uses_openai_sdk(self.model):
            send_gate.warm_up_sender()
        _format_kwargs(self.model, None)
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
    ) -> list[ChunkOutcome]:
        """`extract` for callers that are not async (Dagster ops, Celery tasks, the CLI)."""
        if isinstance(self._redis, aioredis.Redis):
            raise TypeError("extract_sync needs a Redis URL, not an asyncio client bound to another loop")
        return _run_in_loop_thread(
            self.extract(kb_id, schema_version, schema, chunks, should_stop, on_result, delta)
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
    ) -> list[ChunkOutcome]:
        """Extract `chunks` of KB `kb_id` at `schema_version` (whose content is `schema`).

        Returns one outcome per chunk, in order. `should_stop` is called right before every LLM
        call, on the event loop, so it must be cheap (read a flag that something else refreshes);
        once it returns True no new call starts. `on_result` sees each outcome as it is known
        (for progress and spend tracking). With `delta`, each chunk's result is its base merged
        with the answer to a delta prompt (every chunk must have a base).
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
            try:
                await self._extract_missing(key, schema, todo, groups, should_stop, settle, delta)
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
            "%d failed, %.1f s", len(results), kb_id, schema_version, self.model,
            sum(isinstance(r, ChunkExtraction) and r.from_checkpoint for r in results),
            sum(r.llm_calls for r in results), sum(isinstance(r, ChunkFailure) for r in results),
            time.monotonic() - started,
        )
        return results

    # --- internals ------------------------------------------------------------------------------

    def _fail_all(self, chunks: Sequence[ChunkInput], reason: str,
                  on_result: Callable[[ChunkOutcome], None] | None) -> list[ChunkOutcome]:
        reason = scrub(reason, self._secrets)[:_REASON_CHARS]
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
    ) -> None:
        if isinstance(self._redis, aioredis.Redis):
            client = self._redis
        else:
            # Resolving the URL may start the embedded Redis (a subprocess): not on the event loop.
            url: str = self._redis if isinstance(self._redis, str) else await asyncio.to_thread(
                configured_redis_url, self.settings
            )
            client = aioredis.Redis.from_url(url, decode_responses=True, max_connections=self.concurrency + 8)
        limiter = RateLimiter(client, self.model, self.rate_limit, self.settings.max_in_flight, **self.limiter_options)
        await _warm_up(self.model)
        run = _Run(self, key, schema, limiter, should_stop, delta)
        queue: asyncio.Queue[str] = asyncio.Queue()
        for content_hash in todo:
            queue.put_nowait(content_hash)

        async def worker() -> None:
            while True:
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
        finally:
            for task in tasks:
                task.cancel()
            self.missed_slots += limiter.missed_slots
            self.max_send_late_s = max(self.max_send_late_s, run.max_send_late_s)
            await limiter.close()
            await run.close()
            if client is not self._redis:
                await client.aclose()

    async def _checkpoint(self, key: checkpoints.CheckpointKey, content_hash: str,
                          extraction: ChunkExtraction) -> ChunkOutcome:
        # The result was paid for: try hard to keep it, but a chunk whose result cannot be stored is
        # a failure, because the graph is written from the checkpoints.
        error = ""
        for attempt in range(3):
            try:
                await asyncio.to_thread(self._save, key, content_hash, extraction)
                return extraction
            except Exception as exc:
                error = scrub(f"{type(exc).__name__}: {exc}", self._secrets)[:_REASON_CHARS]
                log.warning("could not store the checkpoint of chunk %s (attempt %d): %s",
                            extraction.chunk_id, attempt + 1, error)
                await asyncio.sleep(0.5 * 2 ** attempt)
        return ChunkFailure(
            chunk_id=extraction.chunk_id, llm_calls=extraction.llm_calls,
            reason=f"checkpoint_not_saved: the chunk was extracted but its result could not be stored in the "
                   f"app database ({error}); check LUMIKB_DATABASE_URL and retry",
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

    def _failure_reason(self, exc: BaseException, calls: int) -> str:
        attempts = f"after {calls} call(s)"
        if isinstance(exc, UnusableAnswer):
            reason = f"{exc.code}: {exc.message} ({attempts})"
        elif isinstance(exc, _RetryAfterTooLong):
            reason = f"rate_limited: {exc}; lower LUMIKB_LLM_RATE_LIMIT or retry later"
        else:
            kind, status = _classify(exc), getattr(exc, "status_code", None)
            detail = f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}: {exc}"
            if kind == "rate_limited":
                reason = (f"rate_limited: the provider kept answering 429 ({attempts}); lower "
                          f"LUMIKB_LLM_RATE_LIMIT for {self.model}. {detail}")
            elif isinstance(exc, RedisError):
                reason = (f"rate_limiter_unavailable: Redis did not answer ({attempts}); check LUMIKB_REDIS_URL. "
                          f"{detail}")
            elif kind == "transient":
                reason = f"provider_error: the call kept failing ({attempts}). {detail}"
            elif status in (401, 403):
                reason = f"auth_error: the provider refused the credentials; check LUMIKB_LLM_API_KEY. {detail}"
            elif isinstance(exc, litellm.ContextWindowExceededError):
                reason = f"context_window_exceeded: the chunk is too long for {self.model}; lower " \
                         f"LUMIKB_CHUNK_TOKENS. {detail}"
            elif isinstance(exc, litellm.APIError | litellm.BadRequestError | litellm.NotFoundError):
                reason = f"llm_request_refused: check LUMIKB_LLM_MODEL and LUMIKB_LLM_API_BASE. {detail}"
            else:
                reason = f"unexpected_error: {detail}"
        return scrub(reason, self._secrets)[:_REASON_CHARS]


class _Run:
    """The state of one `extract` call's LLM work (one event loop)."""

    def __init__(self, extractor: ChunkExtractor, key: checkpoints.CheckpointKey, schema: DomainSchema,
                 limiter: RateLimiter, should_stop: Callable[[], bool] | None,
                 delta: DeltaTask | None = None) -> None:
        self.extractor = extractor
        self.key = key
        self.delta = delta
        # The schema answers are validated against: a delta answer may join known entities of any type.
        self.schema = schema if delta is None else delta.request.validation_schema
        self.limiter = limiter
        self.should_stop = should_stop
        self.stopped = False
        self.format_kwargs = _format_kwargs(extractor.model, schema)
        self.openai_client = _gated_openai_client(extractor) if _uses_openai_sdk(extractor.model) else None
        # How early a call enters LiteLLM before its slot: enough for its preparation (5-15 ms, far
        # more while the event loop is busy with other answers: with 0.1 s, 1-5% of the slots were
        # missed on a loaded 2-core machine); the sender thread holds it until then. The cost is a
        # lease held that much longer.
        self.gate_lead_s = 0.25
        self.max_send_late_s = 0.0

    async def close(self) -> None:
        """Close the HTTP client of this run's calls."""
        if self.openai_client is not None:
            await self.openai_client.close()

    def stop_requested(self) -> bool:
        # Sticky: once the caller said stop, nothing asks again and nothing starts.
        if not self.stopped and self.should_stop is not None:
            self.stopped = self.extractor._should_stop(self.should_stop)
        return self.stopped

    async def extract_one(self, chunk: ChunkInput) -> ChunkOutcome:
        usage = _Usage()
        budget = _Budget(self.extractor.retry_policy)
        # A delta chunk always has its base: the caller sends chunks without one as full extractions.
        base = self.delta.bases[chunk.content_hash] if self.delta is not None else None
        if self.delta is not None and base is not None:
            known = [(e.name, e.type) for e in base.entities]
            messages = build_delta_messages(self.delta.request.ask, chunk.text, known)
        else:
            messages = build_messages(self.schema, chunk.text)
        parsed: ParsedAnswer | None = None
        try:
            retrying = AsyncRetrying(retry=budget.retry, wait=budget.wait, stop=budget.stop, reraise=True,
                                     sleep=asyncio.sleep)
            async for attempt in retrying:
                with attempt:
                    parsed = await self._call(messages, usage)
        except _Cancelled:
            return ChunkFailure(chunk_id=chunk.id, reason=CANCELLED, llm_calls=usage.calls)
        except Exception as exc:
            reason = self.extractor._failure_reason(exc, usage.calls)
            if _classify(exc) == "permanent" and not isinstance(exc, UnusableAnswer | litellm.APIError):
                # Not an LLM or network condition: keep the (scrubbed) traceback for whoever debugs it.
                log.error("chunk %s failed unexpectedly: %s", chunk.id,
                          scrub("".join(traceback.format_exception(exc)), self.extractor._secrets))
            else:
                log.warning("chunk %s failed: %s", chunk.id, reason)
            return ChunkFailure(chunk_id=chunk.id, reason=reason, llm_calls=usage.calls)
        assert parsed is not None  # the loop only ends without an exception after a successful attempt
        result = ChunkExtraction(
            chunk_id=chunk.id, entities=parsed.entities, relationships=parsed.relationships, dropped=parsed.dropped,
            llm_calls=usage.calls, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cost_usd=usage.cost_usd,
        )
        if self.delta is not None and base is not None:
            return merge_delta(base, result, self.delta.request)
        return result

    async def _call(self, messages: list[dict[str, str]], usage: _Usage) -> ParsedAnswer:
        extractor = self.extractor
        while True:
            if self.stop_requested():
                raise _Cancelled
            lead_s = self.gate_lead_s if self.openai_client is not None else 0.0
            async with self.limiter.slot(lead_s) as due:
                # Asked again after the wait for the slot, which can take seconds.
                if self.stop_requested():
                    raise _Cancelled
                gate = SendGate(due, self.limiter.late_tolerance_s) if self.openai_client is not None else None
                token = current_gate.set(gate)
                try:
                    response = await litellm.acompletion(
                        model=extractor.model,
                        messages=messages,
                        api_base=extractor.settings.llm_api_base,
                        api_key=extractor._api_key,
                        timeout=extractor.settings.llm_timeout_s,
                        temperature=0,
                        num_retries=0,
                        max_retries=0,
                        drop_params=True,
                        client=self.openai_client,
                        **self.format_kwargs,
                    )
                except litellm.RateLimitError as exc:
                    usage.calls += 1
                    await self.limiter.penalize(_retry_after_s(exc))
                    raise
                except Exception:
                    if gate is not None and gate.missed:
                        # Never sent: LiteLLM's preparation outlasted the lead. Another slot, no attempt used.
                        self.limiter.missed_slots += 1
                        continue
                    usage.calls += int(gate is None or gate.sent)
                    raise
                finally:
                    current_gate.reset(token)
                    if gate is not None and gate.sent:
                        self.max_send_late_s = max(self.max_send_late_s, gate.late_s)
                usage.calls += 1
                break
        response_usage = getattr(response, "usage", None)
        usage.prompt_tokens += int(getattr(response_usage, "prompt_tokens", 0) or 0)
        usage.completion_tokens += int(getattr(response_usage, "completion_tokens", 0) or 0)
        usage.cost_usd += response_cost(response, extractor.model)
        choice = response.choices[0]
        return parse_answer(choice.message.content, self.schema, getattr(choice, "finish_reason", None))


_T = TypeVar("_T")
_loop_lock = threading.Lock()
_loop: tuple[int, asyncio.AbstractEventLoop] | None = None


def _run_in_loop_thread(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run `coro` on the process's long-lived LLM event loop (a daemon thread) and wait for it.

    One loop for the whole process, rather than `asyncio.run` per call, keeps LiteLLM's HTTP
    sessions and the warm-up alive between calls, and works whether or not the calling thread
    runs a loop of its own.
    """
    global _loop
    with _loop_lock:
        # A forked child (Celery prefork, multiprocessing) inherits the variable but not the thread.
        if _loop is None or _loop[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="lumikb-llm-loop", daemon=True).start()
            _loop = (os.getpid(), loop)
        loop = _loop[1]
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


_warmed_up: set[str] = set()


async def _warm_up(model: str) -> None:
    """Run LiteLLM's first-call work (lazy imports, pydantic schema builds) before any timed call.

    A cold first call spends a few hundred milliseconds on the event loop; the calls due meanwhile
    would then leave together and arrive as a burst. A mock call makes no request.
    """
    if model in _warmed_up:
        return
    _warmed_up.add(model)
    try:
        await litellm.acompletion(model=model, messages=[{"role": "user", "content": "warm-up"}],
                                  mock_response='{"entities": [], "relationships": []}')
        from openai.types.chat import ChatCompletion

        ChatCompletion.model_validate({
            "id": "warm-up", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "{}"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })
    except Exception:  # only an optimisation: the real calls will report real problems
        log.debug("LiteLLM warm-up for %s failed", model, exc_info=True)
    # LiteLLM brings ~400,000 long-lived objects; a full garbage collection walks them all and
    # stops every thread for 0.1-0.5 s, long enough to push calls past their slots. Frozen, they are
    # skipped by every later collection (they would never be freed anyway).
    gc.freeze()


def _uses_openai_sdk(model: str) -> bool:
    """True for models LiteLLM reaches through the OpenAI SDK (OpenAI and OpenAI-compatible endpoints)."""
    try:
        return litellm.get_llm_provider(model)[1] == "openai"
    except Exception:  # an unknown provider: no gated client, the plain wait before the call
        return False


def _gated_openai_client(extractor: ChunkExtractor) -> AsyncOpenAI:
    """An OpenAI SDK client whose requests wait for their rate slot at the last moment (`send_gate`)."""
    settings = extractor.settings
    transport = GatedTransport(max_connections=extractor.concurrency + 8,
                               max_keepalive_connections=extractor.concurrency)
    return AsyncOpenAI(
        api_key=extractor._api_key or "none",  # the SDK insists on a key; keyless local servers ignore it
        base_url=settings.llm_api_base or None,
        timeout=settings.llm_timeout_s,
        max_retries=0,  # retries are ours, through the limiter
        http_client=httpx2.AsyncClient(transport=transport, timeout=settings.llm_timeout_s),
    )


def _format_kwargs(model: str, schema: DomainSchema | None) -> dict[str, Any]:
    """Structured output where the model supports it, JSON mode otherwise (dropped if unsupported)."""
    try:
        structured = litellm.supports_response_schema(model=model)
    except Exception:  # an unmapped model: assume the least
        structured = False
    if structured and schema is not None:
        return {"response_format": answer_format(schema)}
    return {"response_format": {"type": "json_object"}}
