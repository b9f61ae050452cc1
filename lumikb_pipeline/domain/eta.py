"""Rate and ETA maths for job progress (pure functions, unit-tested)."""

from __future__ import annotations

from collections.abc import Sequence

RATE_WINDOW_S = 60.0


def rate_per_second(
    finished_at: Sequence[float], now: float, started_at: float | None, window_s: float = RATE_WINDOW_S
) -> float:
    """Documents finished per second over the recent window.

    The window is the last `window_s` seconds, shortened to the time since the job started (or
    since it resumed — a job that restarts after a pause has old finishes outside the window), so a
    young job is not under-reported. No finish in the window means a rate of 0 (paused or stalled).
    """
    window_start = now - window_s
    recent = [t for t in finished_at if window_start < t <= now]
    if not recent:
        return 0.0
    span = window_s
    if started_at is not None and started_at > window_start:
        span = now - started_at
    # A burst right at the start would give an absurd rate over a tiny span: measure at least 1 s.
    span = max(span, 1.0)
    return len(recent) / span


def eta_seconds(remaining: int, rate: float) -> float | None:
    """Seconds until `remaining` documents are done at `rate`; None when unknown (no rate yet,
    paused), 0 when nothing remains."""
    if remaining <= 0:
        return 0.0
    if rate <= 0:
        return None
    return remaining / rate
