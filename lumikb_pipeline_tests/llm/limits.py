"""Checks of a client's behaviour from the server's record of calls (`GET /_calls`)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any


def max_calls_in_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """The most calls that any window [t, t + window_s) holds (sliding, over every start time)."""
    ordered = sorted(times)
    return max((bisect.bisect_left(ordered, t + window_s) - i for i, t in enumerate(ordered)), default=0)


def early_retries(calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Retries that arrived before the Retry-After of the 429 that preceded them (same request)."""
    last: dict[str, dict[str, Any]] = {}
    early = []
    for call in sorted(calls, key=lambda c: c["arrived"]):
        previous = last.get(call["hash"])
        if previous is not None and previous["status"] == 429:
            waited = call["arrived"] - previous["answered"]
            if waited < previous["retry_after"]:
                early.append({**call, "waited": waited, "retry_after": previous["retry_after"]})
        last[call["hash"]] = call
    return early
