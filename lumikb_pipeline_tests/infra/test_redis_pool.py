"""One Redis pool per process (issue 12, point 3): the pipeline's clients are shared, not made per
call, so the connections a worker holds stay flat however many reports and steps it runs. Counted
on the server's own `CLIENT LIST`."""

from __future__ import annotations

import asyncio
import os

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline_tests.conftest import required_env
from lumikb_pipeline_tests.orchestration import resource_probe


def _ours(url: str) -> int:
    return resource_probe.redis_connections(url, resource_probe.local_ports([os.getpid()]))


def test_connect_hands_out_the_processes_one_client() -> None:
    url = required_env("LUMIKB_REDIS_URL")
    settings = Settings(redis_url=url)
    client = redis_client.connect(settings)
    client.ping()
    before = _ours(url)
    for _ in range(200):
        assert redis_client.connect(settings) is client
        redis_client.connect(settings).incr("lumikb-test:pool")
    assert _ours(url) == before >= 1


def test_the_asyncio_client_is_one_per_event_loop() -> None:
    url = required_env("LUMIKB_REDIS_URL")

    async def many_calls() -> tuple[int, int]:
        first = redis_client.shared_async_client(url, 8)
        await first.ping()
        before = _ours(url)
        for _ in range(200):
            client = redis_client.shared_async_client(url, 8)
            assert client is first
            await client.incr("lumikb-test:pool")
        return before, _ours(url)

    loop = asyncio.new_event_loop()
    try:
        before, after = loop.run_until_complete(many_calls())
        assert after == before
        # Another loop gets a client of its own (a pool is bound to its loop).
        other = asyncio.new_event_loop()
        try:
            assert other.run_until_complete(_client_of(url)) is not loop.run_until_complete(_client_of(url))
        finally:
            other.close()
    finally:
        loop.close()


async def _client_of(url: str) -> object:
    return redis_client.shared_async_client(url, 8)


def test_our_connections_carry_their_names_and_celerys_do_not() -> None:
    """`CLIENT LIST` tells the pipeline's connections (`lumikb`), the LLM loop's pool (`lumikb-llm`)
    and everything else (Celery's: no name) apart: what an operator and the memory benchmark read."""
    url = required_env("LUMIKB_REDIS_URL")
    redis_client.connect(Settings(redis_url=url)).ping()

    async def call() -> None:
        await redis_client.shared_async_client(url, 8).ping()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(call())
        named = resource_probe.redis_connections_by_name(url, resource_probe.local_ports([os.getpid()]))
    finally:
        loop.close()
    assert named.get(redis_client.CLIENT_NAME, 0) >= 1 and named.get(redis_client.LLM_CLIENT_NAME, 0) >= 1, named
    assert set(named) <= {redis_client.CLIENT_NAME, redis_client.LLM_CLIENT_NAME, ""}, named
