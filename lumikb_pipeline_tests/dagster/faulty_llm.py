"""The fake LLM server with two more behaviours for the tests: answer 500 to requests whose text
holds a marker (a document's own word), a given number of times or forever; and hold every request
until released (so the steps that call it are all in progress at once).

    python -m lumikb_pipeline_tests.dagster.faulty_llm --port 0
    POST /_poison {"marker": "Zanzibar", "times": 2}     # -1: forever; {"marker": null} clears it
    POST /_hold {"hold": true}                           # false releases the held requests
    GET /_hold -> {"hold": true, "waiting": 24}          # requests being held now

Everything else is `lumikb_pipeline.testing.fake_llm_server` as is.
"""

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from lumikb_pipeline.testing.fake_llm_server import FakeConfig, FakeLLM, warm_up

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Poison:
    def __init__(self) -> None:
        self.marker: str | None = None
        self.times = 0
        self.hits = 0

    def state(self) -> dict[str, Any]:
        return {"marker": self.marker, "times": self.times, "hits": self.hits}


def build_app(config: FakeConfig) -> web.Application:
    poison = Poison()
    fake = FakeLLM(config)
    released = asyncio.Event()
    released.set()
    held = {"waiting": 0}

    @web.middleware
    async def holding(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.endswith("/chat/completions") and not released.is_set():
            held["waiting"] += 1
            try:
                await released.wait()
            finally:
                held["waiting"] -= 1
        return await handler(request)

    async def set_hold(request: web.Request) -> web.Response:
        data = await request.json()
        if data.get("hold"):
            released.clear()
        else:
            released.set()
        return await get_hold(request)

    async def get_hold(_request: web.Request) -> web.Response:
        return web.json_response({"hold": not released.is_set(), "waiting": held["waiting"]})

    @web.middleware
    async def poisoned(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.endswith("/chat/completions") and poison.marker and poison.times != 0:
            body = await request.text()
            if poison.marker in body:
                if poison.times > 0:
                    poison.times -= 1
                poison.hits += 1
                error = {"message": "injected failure for a test", "type": "server_error", "code": "server_error"}
                return web.json_response({"error": error}, status=500)
        return await handler(request)

    async def set_poison(request: web.Request) -> web.Response:
        data = await request.json()
        poison.marker = data.get("marker")
        poison.times = int(data.get("times", -1))
        poison.hits = 0
        return web.json_response(poison.state())

    async def get_poison(_request: web.Request) -> web.Response:
        return web.json_response(poison.state())

    app = fake.app()
    app.middlewares.append(poisoned)
    app.middlewares.append(holding)
    app.router.add_post("/_hold", set_hold)
    app.router.add_get("/_hold", get_hold)
    app.router.add_post("/_poison", set_poison)
    app.router.add_get("/_poison", get_poison)
    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", default="{}", help="FakeConfig fields as JSON")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    host, port = sock.getsockname()[:2]
    warm_up()  # before the announcement: the stack counts arrival times from the first call on
    print(f"listening on http://{host}:{port}", flush=True)
    web.run_app(build_app(FakeConfig.model_validate(json.loads(args.config))), sock=sock, print=None,
                access_log=None, backlog=1024)


if __name__ == "__main__":
    main(sys.argv[1:])
