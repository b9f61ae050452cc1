"""Calling the model through LiteLLM: one chunk's call with its retries (`ChunkCaller`), structured
output, the OpenAI SDK client whose requests wait for their rate slot at the last moment, and the
warm-up of LiteLLM's slow first call."""

from __future__ import annotations

import asyncio
import gc
import logging
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
import litellm
from openai import AsyncOpenAI
from tenacity import AsyncRetrying

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure, ChunkInput
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.domain.schema_diff import DeltaRequest, merge_delta
from lumikb_pipeline.llm.cost import response_cost
from lumikb_pipeline.llm.parse import ParsedAnswer, UnusableAnswer, answer_format, parse_answer
from lumikb_pipeline.llm.prompt import build_delta_messages, build_messages
from lumikb_pipeline.llm.rate_limit import RateLimiter
from lumikb_pipeline.llm.retry import (
    Cancelled,
    RetryBudget,
    RetryPolicy,
    Usage,
    classify,
    failure_reason,
    retry_after_s,
)
from lumikb_pipeline.llm.send_gate import STOPPED, GatedTransport, SendGate, current_gate

log = logging.getLogger("lumikb_pipeline.llm.extractor")

CANCELLED = "cancelled"
ChunkOutcome = ChunkExtraction | ChunkFailure


class ChunkCaller:
    """The LLM calls of one `ChunkExtractor.extract` (one event loop): each chunk through the limiter,
    retried by `retry.RetryBudget`, parsed and validated against `schema`."""

    def __init__(
        self,
        *,
        settings: Settings,
        model: str,
        api_key: str | None,
        concurrency: int,
        retry_policy: RetryPolicy,
        schema: DomainSchema,
        limiter: RateLimiter,
        should_stop: Callable[[], bool] | None,
        delta: tuple[DeltaRequest, Mapping[str, ChunkExtraction]] | None = None,
    ) -> None:
        """`should_stop` is asked before every call (cheap: on the event loop); `concurrency` sizes the
        HTTP connection pool. With `delta` (a request and each chunk's base by content hash), each
        chunk is asked only for the request's added types, with its base's entities as known ones, and
        its result is the base merged with the answer."""
        self.settings = settings
        self.model = model
        self.api_key = api_key
        self.secrets = (api_key,) if api_key else ()
        self.retry_policy = retry_policy
        self.delta = delta
        # The schema answers are validated against: a delta answer may join known entities of any type.
        self.schema = schema if delta is None else delta[0].validation_schema
        self.limiter = limiter
        self.should_stop = should_stop
        self.stopped = False
        self.format_kwargs = format_kwargs(model, schema)
        self.openai_client = (
            gated_openai_client(settings, api_key, concurrency) if uses_openai_sdk(model) else None
        )
        # How early a call enters LiteLLM before its slot: enough for its preparation (5-15 ms, far
        # more while the event loop is busy with other answers); the sender thread holds it until
        # then. On the loaded 2-core test machine, with 0.25 s, the event loop was so late that
        # one slot in five to eight was given up (docs/llm.md). The cost is a lease held that much
        # longer: R of the default in-flight cap's 5·R. When the limiter is idle the slot is only
        # `gate_earliest_s` ahead (the loop is not that busy then), so a lone call waits no longer.
        self.gate_lead_s = 1.0
        self.gate_earliest_s = 0.25
        self.max_send_late_s = 0.0

    async def close(self) -> None:
        """Close the HTTP client of this run's calls."""
        if self.openai_client is not None:
            await self.openai_client.close()

    def stop_requested(self) -> bool:
        # Sticky: once the caller said stop, nothing asks again and nothing starts.
        if not self.stopped and self.should_stop is not None:
            self.stopped = self.should_stop()
        return self.stopped

    async def extract_one(self, chunk: ChunkInput) -> ChunkOutcome:
        """Extract one chunk: an extraction, or a failure with its reason (never raises)."""
        usage = Usage()
        budget = RetryBudget(self.retry_policy)
        # A delta chunk always has its base: the caller sends chunks without one as full extractions.
        base = self.delta[1][chunk.content_hash] if self.delta is not None else None
        if self.delta is not None and base is not None:
            known = [(e.name, e.type) for e in base.entities]
            messages = build_delta_messages(self.delta[0].ask, chunk.text, known)
        else:
            messages = build_messages(self.schema, chunk.text)
        parsed: ParsedAnswer | None = None
        try:
            retrying = AsyncRetrying(retry=budget.retry, wait=budget.wait, stop=budget.stop, reraise=True,
                                     sleep=asyncio.sleep)
            async for attempt in retrying:
                with attempt:
                    parsed = await self._call(messages, usage)
        except Cancelled:
            return ChunkFailure(chunk_id=chunk.id, reason=CANCELLED, llm_calls=usage.calls)
        except Exception as exc:
            reason = failure_reason(exc, usage.calls, self.model, self.secrets, budget.outage_s())
            if classify(exc) == "permanent" and not isinstance(exc, UnusableAnswer | litellm.APIError):
                # Not an LLM or network condition: keep the (scrubbed) traceback for whoever debugs it.
                log.error("chunk %s failed unexpectedly: %s", chunk.id,
                          scrub("".join(traceback.format_exception(exc)), self.secrets))
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
            return merge_delta(base, result, self.delta[0])
        return result

    async def _call(self, messages: list[dict[str, str]], usage: Usage) -> ParsedAnswer:
        while True:
            if self.stop_requested():
                raise Cancelled
            gated = self.openai_client is not None
            async with self.limiter.slot(self.gate_lead_s if gated else 0.0,
                                         self.gate_earliest_s if gated else 0.0) as due:
                # Asked again after the wait for the slot, which can take seconds.
                if self.stop_requested():
                    raise Cancelled
                # The sender asks once more at the slot: a stop seen by any call since is not sent.
                gate = SendGate(due, self.limiter.late_tolerance_s, stopped=lambda: self.stopped) if gated else None
                token = current_gate.set(gate)
                try:
                    response = await litellm.acompletion(
                        model=self.model,
                        messages=messages,
                        api_base=self.settings.llm_api_base,
                        api_key=self.api_key,
                        timeout=self.settings.llm_timeout_s,
                        temperature=0,
                        num_retries=0,
                        max_retries=0,
                        drop_params=True,
                        client=self.openai_client,
                        **self.format_kwargs,
                    )
                except litellm.RateLimitError as exc:
                    usage.calls += 1
                    await self.limiter.penalize(retry_after_s(exc))
                    raise
                except Exception:
                    if gate is not None and gate.missed_at == STOPPED:
                        raise Cancelled from None
                    if gate is not None and gate.missed:
                        # Never sent: it could not leave on time (`missed_at` says where). Another slot,
                        # no attempt used.
                        self.limiter.missed_by[gate.missed_at] += 1
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
        usage.cost_usd += response_cost(response, self.model)
        choice = response.choices[0]
        return parse_answer(choice.message.content, self.schema, getattr(choice, "finish_reason", None))


_warmed_up: set[str] = set()


async def warm_up_litellm(model: str) -> None:
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


def uses_openai_sdk(model: str) -> bool:
    """True for models LiteLLM reaches through the OpenAI SDK (OpenAI and OpenAI-compatible endpoints)."""
    try:
        return litellm.get_llm_provider(model)[1] == "openai"
    except Exception:  # an unknown provider: no gated client, the plain wait before the call
        return False


def gated_openai_client(settings: Settings, api_key: str | None, concurrency: int) -> AsyncOpenAI:
    """An OpenAI SDK client whose requests wait for their rate slot at the last moment (`send_gate`)."""
    transport = GatedTransport(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    return AsyncOpenAI(
        api_key=api_key or "none",  # the SDK insists on a key; keyless local servers ignore it
        base_url=settings.llm_api_base or None,
        timeout=settings.llm_timeout_s,
        max_retries=0,  # retries are ours, through the limiter
        http_client=httpx2.AsyncClient(transport=transport, timeout=settings.llm_timeout_s),
    )


def format_kwargs(model: str, schema: DomainSchema | None) -> dict[str, Any]:
    """Structured output where the model supports it, JSON mode otherwise (dropped if unsupported)."""
    try:
        structured = litellm.supports_response_schema(model=model)
    except Exception:  # an unmapped model: assume the least
        structured = False
    if structured and schema is not None:
        return {"response_format": answer_format(schema)}
    return {"response_format": {"type": "json_object"}}
