"""How well a run of LLM calls used a rate limit, from the calls' arrival times at the server (the
fake server's `GET /_calls`), as a provider counts them.

- `busiest_window`: the most calls that arrived within any `width_s` (sliding, half-open windows
  `[t, t + width_s)` starting at each arrival: the count a provider's one-second limit sees).
- `tightest_second`: the shortest time in which limit + 1 calls arrived, the margin to the limit:
  under 1 s, some second held more calls than the limit.
- `steady_windows`: the calls in consecutive windows of `width_s` over the job's steady part, from
  the arrival of its first `head` share of calls to that of its last `tail` share (10% each by
  default), so the ramp-up and the last stragglers are left out.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass


def busiest_window(arrivals: Sequence[float], width_s: float = 1.0) -> int:
    """The most arrivals within any window of `width_s` seconds."""
    times = sorted(arrivals)
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + width_s, lo=i) - i)
    return best


def tightest_second(arrivals: Sequence[float], limit_per_s: float) -> float | None:
    """The shortest time from the first to the last of any limit + 1 consecutive arrivals, to the ms
    (None: not that many arrivals)."""
    calls = math.floor(limit_per_s) + 1
    times = sorted(arrivals)
    spans = [times[i + calls - 1] - times[i] for i in range(len(times) - calls + 1)]
    return round(min(spans), 3) if spans else None


@dataclass(frozen=True)
class SteadyWindows:
    """Calls per window over the steady part of a job, against the limit."""

    start: float  # arrival of the call at the `head` share
    end: float  # arrival of the call at 1 - `tail` share
    width_s: float
    counts: tuple[int, ...]
    limit_per_s: float
    steady_calls: int = 0  # calls from `start` to `end`, the part after the last whole window too

    @property
    def shares(self) -> tuple[float, ...]:
        """Each window's calls as a share of the limit's calls in a window."""
        return tuple(count / (self.limit_per_s * self.width_s) for count in self.counts)

    @property
    def lowest_share(self) -> float:
        return min(self.shares, default=0.0)

    @property
    def mean_share(self) -> float:
        """Calls per second over the whole steady part, as a share of the limit."""
        span = self.end - self.start
        return 0.0 if span <= 0 else self.steady_calls / span / self.limit_per_s


def steady_windows(
    arrivals: Sequence[float], limit_per_s: float, width_s: float = 10.0, head: float = 0.1, tail: float = 0.1
) -> SteadyWindows:
    """Whole windows of `width_s` from the arrival at the `head` share of the calls to the one at
    `1 - tail` (a part shorter than one window gives no window)."""
    times = sorted(arrivals)
    if not times:
        return SteadyWindows(0.0, 0.0, width_s, (), limit_per_s)
    first = times[min(len(times) - 1, math.floor(head * len(times)))]
    last = times[max(0, math.ceil((1 - tail) * len(times)) - 1)]
    counts = []
    start = first
    while start + width_s <= last:
        counts.append(bisect.bisect_left(times, start + width_s) - bisect.bisect_left(times, start))
        start += width_s
    steady_calls = bisect.bisect_left(times, last) - bisect.bisect_left(times, first)
    return SteadyWindows(first, last, width_s, tuple(counts), limit_per_s, steady_calls)


__all__ = ["SteadyWindows", "busiest_window", "steady_windows"]
