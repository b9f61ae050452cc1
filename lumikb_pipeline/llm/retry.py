"""Retrying one chunk's LLM call: which failures are worth another call, how long to wait (never
sooner than the provider's `Retry-After`), how many attempts, and the reason a chunk finally failed.

A provider outage is waited out, not turned into failed documents: on 5xx, timeouts, connection
errors and 429s a chunk backs off (exponentially, capped) and fails only once those failures have
gone on for the policy's outage window (`LUMIKB_LLM_RETRY_WINDOW_S`) and its attempts are spent.
429s have their own, larger attempt budget: they are not billed and say nothing about the chunk.
Unusable answers are the chunk's own: they are retried at once, through the limiter, and fail it
after `max_attempts`, outage or not.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import litellm
from redis.exceptions import RedisError
from tenacity import RetryCallState

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.llm.parse import UnusableAnswer

REASON_CHARS = 500


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one chunk is retried."""

    max_attempts: int = 6  # unusable answers; and 5xx, timeouts, connection errors once the window is over
    max_rate_limited: int = 30  # 429s (not billed, no fault of the chunk's): a separate, larger budget
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 600.0  # a longer Retry-After is a failure, not a wait
    # Seconds of 5xx/429/timeouts/connection errors a chunk waits out before their attempt budgets
    # can fail it (0: the budgets alone decide). Counted from the chunk's first such failure.
    outage_window_s: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy for `LUMIKB_LLM_MAX_ATTEMPTS` (429s get five times as many) and
        `LUMIKB_LLM_RETRY_WINDOW_S`."""
        return cls(max_attempts=settings.llm_max_attempts, max_rate_limited=max(10, 5 * settings.llm_max_attempts),
                   outage_window_s=settings.llm_retry_window_s)


class Cancelled(Exception):
    """should_stop said stop before a call."""


class RetryAfterTooLong(Exception):
    pass


@dataclass
class Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


OUTAGE_KINDS = ("transient", "rate_limited")


@dataclass
class RetryBudget:
    """One chunk's retry state, fed to tenacity's retry/wait/stop hooks (called in that order)."""

    policy: RetryPolicy
    failures: int = 0  # 5xx, timeouts, connection and Redis errors
    unusable: int = 0
    rate_limited: int = 0
    last_retry_after: float | None = None
    last_kind: str = ""
    outage_since: float | None = None  # `clock()` at the chunk's first 5xx/429/timeout/connection error
    clock: Callable[[], float] = time.monotonic

    def retry(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return False
        kind = classify(exc)
        self.last_kind = kind
        self.last_retry_after = retry_after_s(exc)
        if kind in OUTAGE_KINDS and self.outage_since is None:
            self.outage_since = self.clock()
        if kind == "rate_limited":
            self.rate_limited += 1
        elif kind == "transient":
            self.failures += 1
        elif kind == "unusable":
            self.unusable += 1
        else:
            return False
        return True

    def outage_s(self) -> float:
        """How long this chunk's calls have been failing on the provider's side (0: they have not)."""
        return 0.0 if self.outage_since is None else self.clock() - self.outage_since

    def wait(self, state: RetryCallState) -> float:
        if self.last_kind == "unusable":
            # The answer was bad, the service is fine: go again (through the limiter) at once.
            return 0.0
        retries = self.rate_limited if self.last_kind == "rate_limited" else self.failures
        backoff = min(self.policy.backoff_max_s, self.policy.backoff_base_s * 2 ** min(retries - 1, 30))
        jittered = random.uniform(backoff / 2, backoff)
        if self.last_retry_after is not None:
            if self.last_retry_after > self.policy.max_retry_after_s:
                raise RetryAfterTooLong(f"the provider asked to retry after {self.last_retry_after:.0f} s")
            # Never sooner than Retry-After; a little later than it, so retries told the same
            # Retry-After do not all come back in the same instant.
            return max(jittered, self.last_retry_after + random.uniform(0.0, 0.1))
        return jittered

    def stop(self, _state: RetryCallState) -> bool:
        if self.last_kind == "unusable":
            return self.unusable >= self.policy.max_attempts
        spent = (self.rate_limited >= self.policy.max_rate_limited if self.last_kind == "rate_limited"
                 else self.failures >= self.policy.max_attempts)
        return spent and self.outage_s() >= self.policy.outage_window_s


def classify(exc: BaseException) -> str:
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


def retry_after_s(exc: BaseException) -> float | None:
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


def failure_reason(
    exc: BaseException, calls: int, model: str, secrets: tuple[str, ...] = (), failing_for_s: float = 0.0
) -> str:
    """Why a chunk failed after `calls` calls, `failing_for_s` seconds of them failing on the
    provider's side, in words the user can act on (scrubbed, bounded)."""
    attempts = f"after {calls} call(s)" + (f" over {failing_for_s:.0f} s" if failing_for_s >= 1 else "")
    if isinstance(exc, UnusableAnswer):
        reason = f"{exc.code}: {exc.message} ({attempts})"
    elif isinstance(exc, RetryAfterTooLong):
        reason = f"rate_limited: {exc}; lower LUMIKB_LLM_RATE_LIMIT or retry later"
    else:
        kind, status = classify(exc), getattr(exc, "status_code", None)
        detail = f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}: {exc}"
        if kind == "rate_limited":
            reason = (f"rate_limited: the provider kept answering 429 ({attempts}); lower "
                      f"LUMIKB_LLM_RATE_LIMIT for {model}. {detail}")
        elif isinstance(exc, RedisError):
            reason = (f"rate_limiter_unavailable: Redis did not answer ({attempts}); check LUMIKB_REDIS_URL. "
                      f"{detail}")
        elif kind == "transient":
            reason = (f"provider_error: the call kept failing ({attempts}); the provider may be down, "
                      f"LUMIKB_LLM_RETRY_WINDOW_S says how long to wait it out. {detail}")
        elif status in (401, 403):
            reason = f"auth_error: the provider refused the credentials; check LUMIKB_LLM_API_KEY. {detail}"
        elif isinstance(exc, litellm.ContextWindowExceededError):
            reason = f"context_window_exceeded: the chunk is too long for {model}; lower " \
                     f"LUMIKB_CHUNK_TOKENS. {detail}"
        elif isinstance(exc, litellm.APIError | litellm.BadRequestError | litellm.NotFoundError):
            reason = f"llm_request_refused: check LUMIKB_LLM_MODEL and LUMIKB_LLM_API_BASE. {detail}"
        else:
            reason = f"unexpected_error: {detail}"
    return scrub(reason, secrets)[:REASON_CHARS]
