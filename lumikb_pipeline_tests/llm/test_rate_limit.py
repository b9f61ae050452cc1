"""The Redis rate limiter: even spacing (GCRA, burst 1), shared across clients, per model, penalties
after 429s, and an in-flight cap whose leases come back when their holder dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from lumikb_pipeline.core.config import RateLimit, parse_rate_limit
from lumikb_pipeline.llm.rate_limit import RateLimiter
from lumikb_pipeline.testing.call_rates import busiest_window

T = TypeVar("T")


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return asyncio.run(main())


@asynccontextmanager
async def client(url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield redis
    finally:
        await redis.aclose()


def limiter(redis: aioredis.Redis, rate: str = "20/s", max_in_flight: int = 100, model: str = "m",
            **options: Any) -> RateLimiter:
    return RateLimiter(redis, model, parse_rate_limit(rate), max_in_flight, **options)


def test_reservations_are_spaced_by_one_emission_interval_with_no_burst(redis_url: str) -> None:
    async def main() -> list[float]:
        async with client(redis_url) as redis:
            lim = limiter(redis, "20/s", headroom=0.0)
            return [await lim.reserve() for _ in range(10)]

    waits = run(main)

    # The first call may go at once; every further one is exactly 1/rate later than the previous.
    assert waits[0] < 0.01
    steps = [b - a for a, b in zip(waits, waits[1:], strict=False)]
    assert all(abs(step - 0.05) < 0.01 for step in steps), steps


def test_concurrent_callers_in_two_clients_share_one_even_schedule(redis_url: str) -> None:
    entered: list[float] = []

    async def main() -> None:
        async with client(redis_url) as first, client(redis_url) as second:
            limiters = [limiter(first, "20/s"), limiter(second, "20/s")]

            async def call(i: int) -> None:
                async with limiters[i % 2].slot():
                    entered.append(time.monotonic())

            await asyncio.gather(*(call(i) for i in range(30)))
            await asyncio.gather(*(lim.close() for lim in limiters))

    started = time.monotonic()
    run(main)

    assert busiest_window(entered) <= 20
    assert 29 / 20 <= time.monotonic() - started < 29 / 20 + 1.0  # the limit is also used, not just held


def test_each_model_has_its_own_limit(redis_url: str) -> None:
    async def main() -> tuple[float, float]:
        async with client(redis_url) as redis:
            busy, other = limiter(redis, "2/s", model="openai/gpt-4o"), limiter(redis, "2/s", model="lumikb/offline")
            for _ in range(4):
                await busy.reserve()
            return await busy.reserve(), await other.reserve()

    busy_wait, other_wait = run(main)

    assert busy_wait > 1.5 and other_wait < 0.01


def test_a_429_slows_the_shared_limit_down_for_everyone_for_a_while(redis_url: str) -> None:
    async def main() -> tuple[list[float], list[float]]:
        async with client(redis_url) as redis:
            hit, bystander = limiter(redis, "20/s", headroom=0.0), limiter(redis, "20/s", headroom=0.0)
            await hit.penalize(retry_after_s=0.5)
            slowed = [await bystander.reserve() for _ in range(4)]
            await redis.delete(bystander.penalty_key)  # the penalty's time is up
            await asyncio.sleep(slowed[-1])
            normal = [await bystander.reserve() for _ in range(4)]
            return slowed, normal

    slowed, normal = run(main)

    assert all(abs((b - a) - 0.1) < 0.01 for a, b in zip(slowed, slowed[1:], strict=False)), slowed
    assert all(abs((b - a) - 0.05) < 0.01 for a, b in zip(normal, normal[1:], strict=False)), normal


def test_a_penalty_lasts_at_least_penalty_s_or_the_retry_after(redis_url: str) -> None:
    async def main() -> tuple[int, int]:
        async with client(redis_url) as redis:
            lim = limiter(redis, penalty_s=3.0)
            await lim.penalize(retry_after_s=1.0)
            short = int(await redis.pttl(lim.penalty_key))
            await lim.penalize(retry_after_s=30.0)
            return short, int(await redis.pttl(lim.penalty_key))

    short, long = run(main)

    assert 2_000 < short <= 3_000 and 29_000 < long <= 30_000


def test_no_more_calls_than_the_in_flight_cap_run_at_once(redis_url: str) -> None:
    running, peak = 0, 0

    async def main() -> None:
        nonlocal running, peak
        async with client(redis_url) as first, client(redis_url) as second:
            limiters = [limiter(first, "1000/s", max_in_flight=3), limiter(second, "1000/s", max_in_flight=3)]

            async def call(i: int) -> None:
                nonlocal running, peak
                async with limiters[i % 2].slot():
                    running += 1
                    peak = max(peak, running)
                    await asyncio.sleep(0.05)
                    running -= 1

            await asyncio.gather(*(call(i) for i in range(20)))
            assert await limiters[0].in_flight() == 0

    run(main)

    assert peak == 3


def test_a_cancelled_caller_gives_its_lease_back(redis_url: str) -> None:
    async def main() -> int:
        async with client(redis_url) as redis:
            lim = limiter(redis, "1000/s", max_in_flight=1)

            async def hold() -> None:
                async with lim.slot():
                    await asyncio.sleep(10)

            task = asyncio.create_task(hold())
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            started = time.monotonic()
            await asyncio.wait_for(lim.acquire_lease(), timeout=2)
            return round(time.monotonic() - started)

    assert run(main) == 0


_HOLDER = """
import asyncio, sys, time
import redis.asyncio as aioredis
from lumikb_pipeline.core.config import parse_rate_limit
from lumikb_pipeline.llm.rate_limit import RateLimiter

async def main():
    redis = aioredis.Redis.from_url(sys.argv[1], decode_responses=True)
    lim = RateLimiter(redis, "m", parse_rate_limit("1000/s"), 2, lease_ttl_s=1.5)
    for _ in range(2):
        await lim.acquire_lease()
    print("holding", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow  # leases waited out until they expire: out of the fast step
def test_the_leases_of_a_crashed_worker_come_back_when_they_expire(redis_url: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, redis_url], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"

        async def main() -> tuple[bool, float]:
            async with client(redis_url) as redis:
                lim = limiter(redis, "1000/s", max_in_flight=2, lease_ttl_s=1.5)
                # While the holder lives it renews its leases, so nothing is free for a while.
                try:
                    await asyncio.wait_for(lim.acquire_lease(), timeout=2.0)
                    blocked = False
                except TimeoutError:
                    blocked = True
                os.kill(holder.pid, signal.SIGKILL)  # a crash: no release, no more renewals
                started = time.monotonic()
                await asyncio.wait_for(lim.acquire_lease(), timeout=5.0)
                await lim.close()
                return blocked, time.monotonic() - started

        blocked, waited = run(main)
    finally:
        holder.kill()
        holder.wait()

    assert blocked, "the live holder's leases expired although it was renewing them"
    assert waited <= 1.5 + 0.5


def test_the_limit_of_a_model_comes_from_its_rate(redis_url: str) -> None:
    async def main() -> RateLimiter:
        async with client(redis_url) as redis:
            return limiter(redis, "600/m", headroom=0.05)

    lim = run(main)

    assert lim.rate == RateLimit(600.0, 60.0)
    assert lim.interval_s == pytest.approx(1 / (10 * 0.95))
    assert lim.late_tolerance_s == pytest.approx((10 * lim.interval_s - 1) / 3)
