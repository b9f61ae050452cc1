"""Rate and ETA maths for job progress (pure functions, unit-tested).

The rate is measured from what the job has actually done: the documents it finished (succeeded or
failed; cancelled and skipped ones cost no work) over its own active time, which starts at its first
finished document, not when the job was created (queueing and the first batch's extraction are not
throughput). A recent window corrects it when the pace changes (runs ramping up, a provider slowing
down). Before there is evidence (fewer than `MIN_FINISHES` finishes, or under `MIN_SPAN_S` seconds
of active time) the rate is unknown (None), not a guess. A pause (no finish for far longer than the
job's usual interval) makes the rate 0 and the ETA unknown; on resuming, only the finishes since
the pause count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

# Evidence needed before a rate is given.
MIN_FINISHES = 3
MIN_SPAN_S = 1.0
# A gap between finishes longer than max(PAUSE_MIN_S, PAUSE_FACTOR x the usual interval) is a pause.
PAUSE_MIN_S = 60.0
PAUSE_FACTOR = 10.0
# The recent window: the latest third of the active time, at least RECENT_MIN_S seconds; once it holds
# RECENT_MIN_FINISHES finishes its rate weighs RECENT_WEIGHT against the overall one.
RECENT_FRACTION = 1 / 3
RECENT_WEIGHT = 0.75
RECENT_MIN_S = 10.0
RECENT_MIN_FINISHES = 5
# A wait since the latest group of finishes began counts against the rate only beyond this many times
# the longest gap between groups the job has shown: a new longest gap is common noise (with n gaps
# so far, the next is the longest with chance 1/(n+1)), so one late batch does not swing the ETA.
SLOW_WAIT_FACTOR = 1.5
# How many of the latest finishes the reader loads (enough for the rate of any job).
MAX_FINISHES_READ = 5000


def _pause_limit(count: int, span: float) -> float:
    usual = span / (count - 1) if count > 1 and span > 0 else 0.0
    return max(PAUSE_MIN_S, PAUSE_FACTOR * usual)


def active_finishes(finished_at: Sequence[float], now: float) -> list[float]:
    """The finishes since the job last resumed: a long gap (a pause) drops the ones before it."""
    times = sorted(t for t in finished_at if t <= now)
    start = 0
    for i in range(1, len(times)):
        count = i - start  # finishes before this gap; too few say nothing of the usual interval
        if count >= MIN_FINISHES and times[i] - times[i - 1] > _pause_limit(count, times[i - 1] - times[start]):
            start = i
    return times[start:]


def _group_starts(times: Sequence[float]) -> list[int]:
    """Where each group of sorted finish times begins: a finish more than half the mean interval
    after the previous one starts a group."""
    if len(times) < 2 or times[-1] <= times[0]:
        return [0] if times else []
    mean = (times[-1] - times[0]) / (len(times) - 1)
    return [0] + [i for i in range(1, len(times)) if times[i] - times[i - 1] > mean / 2]


def _whole_groups_after(times: Sequence[float], cutoff: float) -> Sequence[float]:
    """The sorted finish times after `cutoff`, and the earlier ones of a group the cutoff cuts (its
    tail alone would count as a whole group over a shorter time)."""
    first = next((i for i, t in enumerate(times) if t > cutoff), len(times))
    if first == 0 or len(times) - first < 2 or times[-1] <= times[first]:
        return times[first:]
    mean = (times[-1] - times[first]) / (len(times) - first - 1)
    while first > 0 and times[first] - times[first - 1] <= mean / 2:
        first -= 1
    return times[first:]


class _Pace(NamedTuple):
    rate: float  # documents per second
    counted: int  # the finishes of the complete groups
    longest_gap: float  # between two groups' starts (or the `normal_wait` given)
    mean_gap: float  # between two groups' starts


def _paced(times: Sequence[float], now: float, normal_wait: float = 0.0) -> _Pace | None:
    """The pace of sorted finish times, or None without two groups.

    Finishes come in groups (a run writes its batch one document after the other, then the next run
    extracts; `_group_starts`). The rate is the finishes of the complete groups over the time from
    the first group's start to the last group's start, so it is the same just after a group, in the
    middle of one and just before the next. A wait since the last group's start longer than
    `SLOW_WAIT_FACTOR` times the longest gap between groups so far (or `normal_wait`, the job's
    longest when `times` is its recent part) counts too, beyond that, so a slowdown shows before the
    next finish, while a wait near what the job has already shown (one slow batch on a busy machine)
    does not swing the rate.
    """
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    starts = _group_starts(times)
    if len(starts) < 2:
        return None
    counted = starts[-1]  # the finishes before the last (maybe unfinished) group
    groups_span = times[starts[-1]] - times[0]
    longest_gap = max(normal_wait, *(times[b] - times[a] for a, b in zip(starts, starts[1:], strict=False)))
    span = groups_span + max(0.0, (now - times[starts[-1]]) - SLOW_WAIT_FACTOR * longest_gap)
    return _Pace(counted / span, counted, longest_gap, groups_span / (len(starts) - 1))


def rate_per_second(finished_at: Sequence[float], now: float) -> float | None:
    """Documents finished per second, or None while there is not enough evidence.

    Overall rate: the job's active time since its first finish (`_paced`). Recent rate: the same
    over the latest third of that time (at least `RECENT_MIN_S`), in whole groups; once it counts
    enough finishes over more than one group, it weighs 3:1 against the overall one, so a change of
    pace (a slow start) fades within a third of the job's age while a short burst cannot swing it.
    0 when the job has paused.
    """
    times = active_finishes(finished_at, now)
    if len(times) < MIN_FINISHES or now - times[0] < MIN_SPAN_S:
        return None
    if now - times[-1] > _pause_limit(len(times), times[-1] - times[0]):
        return 0.0
    overall = _paced(times, now)
    if overall is None or overall.counted < MIN_FINISHES - 1:
        return None
    span = now - times[0]
    window = max(RECENT_MIN_S, RECENT_FRACTION * span)
    if window >= span:
        return overall.rate
    part = _whole_groups_after(times, now - window)
    # A part shorter than half the job's mean gap between groups is one batch, not a pace.
    one_batch = not part or part[-1] - part[0] < overall.mean_gap / 2
    recent = None if one_batch else _paced(part, now, normal_wait=overall.longest_gap)
    if recent is None or recent.counted < RECENT_MIN_FINISHES:
        return overall.rate
    return RECENT_WEIGHT * recent.rate + (1 - RECENT_WEIGHT) * overall.rate


def eta_seconds(remaining: int, rate: float | None) -> float | None:
    """Seconds until `remaining` documents are done at `rate`; None when unknown (no rate yet,
    paused), 0 when nothing remains."""
    if remaining <= 0:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return remaining / rate
