"""The global LLM rate limiter: one limit for every worker process on every machine, kept in Redis.

Two limits hold together, per model:

- **Rate** (`LUMIKB_LLM_RATE_LIMIT`, default `10/s`): GCRA (the generic cell rate algorithm) with a
  burst of one, in a Lua script. Each caller *reserves* the next free slot: the script returns the
  slot's time (the theoretical arrival time, TAT) and moves the TAT on by one emission interval
  (1/rate). The caller sleeps until its slot and calls then. Slots are spaced evenly, so no window
  of one second ever holds more than `rate` calls, which is how providers count, and there is no
  polling: a caller wakes once, at its slot. Redis' own clock (`TIME`) is the only clock used, so
  machines with skewed clocks still share one schedule.
- **Calls in flight** (`LUMIKB_LLM_MAX_IN_FLIGHT`): a semaphore made of leases in a sorted set,
  scored by expiry. Holders renew their leases in the background; a crashed worker stops renewing
  and its slots come back when the leases expire (`lease_ttl_s`).

What counts is when calls reach the provider, so slots are spaced 5% wider than 1/rate
(`DEFAULT_HEADROOM`), a call that cannot leave within a third of that slack of its slot gives the
slot up, and callers that can hold the request back at the last moment (`send_gate`) reserve slots
at least `lead_s` ahead and enter their call that early.

A caller takes an in-flight lease *before* reserving a rate slot, never after: a reserved slot that
then waited for a lease would be used late and bunch up with the next ones, breaking the limit.
The lease therefore also covers the (bounded) wait for the slot; the default in-flight cap leaves
room for that (see `Settings.max_in_flight`).

When the provider answers 429 anyway, `penalize` slows everyone down: for `penalty_s` seconds the
emission interval is multiplied by `penalty_factor` (the rate is halved by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from lumikb_pipeline.core.config import RateLimit, Settings

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "lumikb:llm"
# Share of the configured rate deliberately left unused. A call reaches the provider some ms after
# its slot, by an amount that varies from call to call (the sender thread's wake-up, the connection,
# the provider's own handling, scheduling on a busy machine); with slots exactly 1/rate apart, one
# late call and an on-time call `rate` slots later would put rate+1 calls into one second at the
# provider. The slots of one second span 1/(1 - headroom) s, whatever the rate: 5% leaves 53 ms of
# slack for that variation, at a cost of 0.5 calls/s at 10/s. (With 3.5%, 36 ms, a full-size
# re-extraction on a quiet 2-core machine saw one second of 11 calls at a 10/s limit; with 3%, one
# run of the limiter benchmark in about eight did.)
DEFAULT_HEADROOM = 0.05

# KEYS[1] = TAT, KEYS[2] = penalty; ARGV[1] = emission interval, ARGV[2] = earliest slot from now,
# both in microseconds. Returns {slot, now} in microseconds of Redis' clock.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1]) * tonumber(redis.call('GET', KEYS[2]) or '1')
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now + tonumber(ARGV[2]) then tat = now + tonumber(ARGV[2]) end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
return {tat, now}
"""

# KEYS[1] = penalty; ARGV[1] = factor, ARGV[2] = duration in ms. Never shortens a running penalty.
_PENALIZE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""

# KEYS[1] = leases (sorted set, score = expiry in ms); ARGV = cap, lease id, ttl in ms.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
  return 1
end
return 0
"""

# KEYS[1] = leases; ARGV[1] = ttl in ms, ARGV[2..] = lease ids. Renews those still held; returns how many.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
    renewed = renewed + 1
  end
end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return renewed
"""


class _ClockOffset:
    """Redis' clock minus this machine's clock, for turning slot times into local times.

    Starts at zero, which is exact when Redis runs on the same machine and within NTP's accuracy
    when it does not. Round trips of the limiter's own scripts that take under 5 ms bracket Redis'
    `TIME` tightly enough (±2.5 ms) to correct a skewed clock; slower ones are ignored, because a
    busy event loop or connection pool makes their midpoint meaningless.
    """

    EXACT_ENOUGH_S = 0.005

    def __init__(self) -> None:
        self.offset = 0.0
        self.rtt = self.EXACT_ENOUGH_S
        self.measured_at = 0.0

    def update(self, redis_now: float, sent: float, received: float) -> float:
        rtt = received - sent
        if rtt < self.rtt or (rtt < self.EXACT_ENOUGH_S and received - self.measured_at > 60.0):
            self.offset, self.rtt, self.measured_at = redis_now - (sent + received) / 2, rtt, received
        return self.offset


class RateLimiter:
    """The shared limiter of one model: `async with limiter.slot(): <one LLM call>`.

    Every process and machine that builds a limiter for the same model on the same Redis shares
    its limits. One instance serves the whole event loop that uses it.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        model: str,
        rate: RateLimit,
        max_in_flight: int,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        headroom: float = DEFAULT_HEADROOM,
        lease_ttl_s: float = 30.0,
        penalty_factor: float = 2.0,
        penalty_s: float = 10.0,
        poll_s: float = 0.02,
    ) -> None:
        if not 0 <= headroom < 0.5:
            raise ValueError("headroom is the share of the rate left unused; use 0 <= headroom < 0.5")
        self.redis = redis
        self.model = model
        self.rate = rate
        self.max_in_flight = max_in_flight
        self.lease_ttl_s = lease_ttl_s
        self.penalty_factor = penalty_factor
        self.penalty_s = penalty_s
        self.poll_s = poll_s
        self.interval_s = 1.0 / (rate.per_second * (1.0 - headroom))
        # How late a call may leave and still use its slot: a third of the slack that the headroom
        # leaves in a one-second window (the `per_window` slots of a window span 1 s + slack; 18 ms
        # at the default), so two thirds (35 ms) absorb the variation after it leaves (network,
        # the provider's own handling, which the limiter cannot see). On a busy 2-core machine the
        # sender thread wakes 10-15 ms late; with 12 ms, 1-4% of the slots were given up.
        per_window = max(1, math.floor(rate.per_second))
        slack_s = per_window * self.interval_s - 1.0
        self.late_tolerance_s = max(0.002, slack_s / 3)
        self.missed_by: Counter[str] = Counter()  # slots given up, by where they were found late
        # The model sits in a hash tag, so both keys of a script land on one Redis Cluster slot.
        prefix = f"{namespace}:{{{model}}}"
        self.tat_key = f"{prefix}:gcra"
        self.penalty_key = f"{prefix}:penalty"
        self.leases_key = f"{prefix}:in_flight"
        self._reserve = redis.register_script(_RESERVE)
        self._penalize = redis.register_script(_PENALIZE)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._clock = _ClockOffset()
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._poller: asyncio.Lock | None = None

    @property
    def missed_slots(self) -> int:
        """Rate slots given up so far (a call could not leave on time)."""
        return sum(self.missed_by.values())

    @classmethod
    def from_settings(cls, settings: Settings, redis: aioredis.Redis, model: str | None = None,
                      **options: Any) -> RateLimiter:
        """The limiter for `model` (default: the configured one) with the configured limits."""
        model = model or settings.llm_model
        return cls(redis, model, settings.rate_limit_for(model), settings.max_in_flight, **options)

    @contextlib.asynccontextmanager
    async def slot(self, lead_s: float = 0.0, earliest_s: float | None = None) -> AsyncIterator[float]:
        """Wait for an in-flight lease and then for the next rate slot; the body is the call.

        Yields the slot's time (`loop.time()` clock). With `lead_s`, the body is entered that much
        before the slot and must itself hold the request back until the slot (see `send_gate`);
        the slot is at least `earliest_s` (default `lead_s`) ahead, so when the limiter is idle
        the body gets only that much.
        """
        lease = await self.acquire_lease()
        try:
            yield await self.wait_for_slot(lead_s, earliest_s)
        finally:
            await self.release_lease(lease)

    async def wait_for_slot(self, lead_s: float = 0.0, earliest_s: float | None = None) -> float:
        """Reserve a rate slot at least `earliest_s` (default `lead_s`) ahead and sleep until
        `lead_s` before it; return the slot's `loop.time()`.

        A caller that wakes too late gives its slot up and reserves another: a call that leaves
        well after its slot (the event loop was busy, the process was paused) would land next to
        the following slot's call. That costs one slot of throughput and never the limit.
        """
        loop = asyncio.get_running_loop()
        while True:
            # A slot at least `earliest_s` ahead, even when the limiter is idle: the call needs
            # that time to be prepared before its slot.
            wait = await self.reserve(earliest_s=lead_s if earliest_s is None else min(earliest_s, lead_s))
            due = loop.time() + wait
            await asyncio.sleep(max(0.0, wait - lead_s))
            late = loop.time() - due  # waking within the lead is on time: the gate does the rest
            if late <= self.late_tolerance_s:
                return due
            self.missed_by["the call woke late"] += 1
            log.debug("woke %.0f ms late for the rate slot of %s; reserving another", late * 1000, self.model)

    async def reserve(self, earliest_s: float = 0.0) -> float:
        """Reserve the next rate slot, `earliest_s` from now at the soonest; return the seconds until it."""
        interval_us = max(1, round(self.interval_s * 1_000_000))
        sent = time.time()
        slot, now = cast(list[int], await self._reserve(keys=[self.tat_key, self.penalty_key],
                                                        args=[interval_us, round(earliest_s * 1_000_000)]))
        received = time.time()
        offset = self._clock.update(int(now) / 1_000_000, sent, received)
        # The slot on this machine's clock. Counting `slot - now` from when the reply was read (or
        # from when the request was written) would move the slot by however long this event loop
        # and the connection pool took around the round trip: tens of ms when they are busy.
        return max(0.0, int(slot) / 1_000_000 - offset - time.time())

    async def penalize(self, retry_after_s: float | None = None) -> None:
        """Slow the shared limit down after a 429: everyone's interval grows for `penalty_s` seconds
        (or for the provider's Retry-After, when that is longer)."""
        duration_s = max(self.penalty_s, retry_after_s or 0.0)
        await self._penalize(keys=[self.penalty_key], args=[self.penalty_factor, round(duration_s * 1000)])
        log.info("LLM rate limit for %s slowed down by %.1fx for %.0f s after a 429",
                 self.model, self.penalty_factor, duration_s)

    async def acquire_lease(self) -> str:
        """Wait for one of the `max_in_flight` leases; return its id (for `release_lease`)."""
        lease = uuid.uuid4().hex
        ttl_ms = round(self.lease_ttl_s * 1000)
        if self._poller is None:
            self._poller = asyncio.Lock()
        # One waiter per process polls Redis; the others queue on the lock in order. That keeps the
        # polling load independent of the number of local callers and serves local callers FIFO.
        async with self._poller:
            while not await self._acquire(keys=[self.leases_key], args=[self.max_in_flight, lease, ttl_ms]):
                await asyncio.sleep(self.poll_s * random.uniform(0.5, 1.5))
        self._held.add(lease)
        self._ensure_renewer()
        return lease

    async def release_lease(self, lease: str) -> None:
        """Give a lease back at once (an expired one is gone already)."""
        self._held.discard(lease)
        try:
            # Shielded: a cancelled caller must still give its slot back, or it is lost until expiry.
            await asyncio.shield(self.redis.zrem(self.leases_key, lease))
        except (RedisError, OSError) as exc:
            # Redis away (restarting): the lease, no longer renewed, expires within `lease_ttl_s`.
            # Raising here would throw away the answer of the call the lease covered, paid for.
            log.warning("could not give back the in-flight lease of %s (it expires on its own): %s",
                        self.model, type(exc).__name__)

    async def in_flight(self) -> int:
        """Leases held now across all processes (expired ones not counted)."""
        return int(await self.redis.zcount(self.leases_key, time.time() * 1000, "+inf"))

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        ttl_ms = round(self.lease_ttl_s * 1000)
        while self._held:
            await asyncio.sleep(self.lease_ttl_s / 3)
            held = list(self._held)
            if not held:
                break
            try:
                renewed = await self._renew(keys=[self.leases_key], args=[ttl_ms, *held])
            except Exception:  # a Redis hiccup must not kill the calls; retry next round
                log.warning("could not renew LLM in-flight leases; retrying", exc_info=True)
                continue
            if int(renewed) < len(held):
                # Possible after a long stall (e.g. a paused process): the cap may be exceeded briefly.
                log.warning("%d in-flight lease(s) of %s expired before renewal", len(held) - int(renewed),
                            self.model)

    async def close(self) -> None:
        """Stop renewing (leases still held expire on their own); call when the event loop ends."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
