"""Checks of a client's behaviour from the server's record of calls (`GET /_calls`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


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


def wait_for_idle_cpus(max_busy: float = 0.25, settled_s: float = 3.0, timeout_s: float = 90.0) -> float:
    """Wait until this machine's CPUs have been at most `max_busy` busy for `settled_s` (Linux
    `/proc/stat`), at most `timeout_s`; return the seconds waited.

    A precaution for tests that measure calls per second at the server: in CI they run in their own
    step right after the fast tests (docs/testing.md), and a machine still busy with what ran before
    (Neo4j keeps working for a while after heavy writes) delays the senders, which would measure
    the previous work, not the limiter. When the machine does not settle in time the test runs
    anyway.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    started = time.monotonic()
    quiet_since: float | None = None
    busy, total = sample()
    while time.monotonic() - started < timeout_s:
        time.sleep(0.5)
        busy2, total2 = sample()
        share = (busy2 - busy) / max(1, total2 - total)
        busy, total = busy2, total2
        now = time.monotonic()
        if share > max_busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settled_s:
            break
    return time.monotonic() - started
