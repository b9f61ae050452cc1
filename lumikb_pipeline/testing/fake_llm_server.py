"""A fake LLM server speaking the OpenAI chat-completions API, for tests and benchmarks.

    python -m lumikb_pipeline.testing.fake_llm_server --port 8999 --latency-mean 1 --latency-jitter 0.3
    lumikb-fake-llm --port 0 --rate-429 0.3 --retry-after 1 --seed 7

Clients talk to it through LiteLLM like to any OpenAI-compatible endpoint (model
`openai/gpt-4o-mini`, `api_base=http://127.0.0.1:PORT/v1`). Answers are derived from the chunk text
and the schema embedded in the prompt by the same rules as the offline model (`heuristic.extract`).

Misbehaviour is configurable (latency, shares of 429s with `Retry-After`, 5xx and malformed answers)
and deterministic: each request's fate is drawn from a generator seeded by (seed, request hash,
attempt number), where the attempt number counts earlier arrivals of the same request. A run with
the same seed and the same requests gets the same answers in any order.

Every call is recorded so a test can check the client from the server's side:
- `GET /_calls` -> `{"calls": [{"arrived", "answered", "hash", "attempt", "status", "kind",
  "retry_after", "chunk"}, ...]}`: times are `time.time()` of this process, `hash` identifies the
  request (the same for its retries), `chunk` is the first 16 hex digits of the SHA-256 of the
  chunk text in the prompt (null when the call was refused before the prompt was read);
- `POST /_reset` clears the record and the attempt counters;
- `GET /_config` / `POST /_config` read and change the behaviour at run time (partial JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from lumikb_pipeline.domain.chunking import count_tokens
from lumikb_pipeline.llm import heuristic
from lumikb_pipeline.llm.prompt import PromptFormatError, chat_prompt_tokens, read_prompt, read_prompt_request

MalformedKind = Literal["malformed_json", "truncated", "prose", "empty", "unknown_types", "bad_endpoints"]
MALFORMED_KINDS: tuple[MalformedKind, ...] = (
    "malformed_json", "truncated", "prose", "empty", "unknown_types", "bad_endpoints"
)


class FakeConfig(BaseModel):
    """How the fake server behaves; every field can be changed at run time with `POST /_config`."""

    model_config = ConfigDict(extra="forbid")

    latency_mean_s: float = Field(default=0.0, ge=0)
    latency_jitter_s: float = Field(default=0.0, ge=0)  # latency is uniform in mean ± jitter, never < 0
    rate_429: float = Field(default=0.0, ge=0, le=1)
    retry_after_s: float = Field(default=1.0, ge=0)
    rate_5xx: float = Field(default=0.0, ge=0, le=1)
    malformed_rate: float = Field(default=0.0, ge=0, le=1)
    malformed_kinds: list[MalformedKind] = Field(default_factory=lambda: list(MALFORMED_KINDS))
    truncate_at: float = Field(default=0.6, gt=0, lt=1)  # share of the answer a truncated one keeps
    seed: int = 0
    # When set, requests with another key get a 401 that quotes the key they presented (as OpenAI does).
    require_api_key: str | None = None
    # 5xx bodies quote the request's Authorization header, like a careless proxy would.
    echo_key_in_5xx: bool = False


def request_hash(messages: Sequence[Any]) -> str:
    """The identity of a request (its messages), the same for every retry of it."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class FakeLLM:
    """The server's state: its configuration, attempt counters and the record of calls."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.calls: list[dict[str, Any]] = []
        self.attempts: dict[str, int] = {}

    def app(self) -> web.Application:
        """The aiohttp application serving the chat-completions API and the control endpoints."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/chat/completions", self.chat_completions)
        app.router.add_get("/_calls", self.get_calls)
        app.router.add_post("/_reset", self.reset)
        app.router.add_get("/_config", self.get_config)
        app.router.add_post("/_config", self.set_config)
        app.router.add_get("/_health", self.health)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def get_calls(self, _request: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls})

    async def reset(self, _request: web.Request) -> web.Response:
        self.calls.clear()
        self.attempts.clear()
        return web.json_response({"ok": True})

    async def get_config(self, _request: web.Request) -> web.Response:
        return web.json_response(self.config.model_dump())

    async def set_config(self, request: web.Request) -> web.Response:
        changes = await request.json()
        self.config = FakeConfig.model_validate({**self.config.model_dump(), **changes})
        return web.json_response(self.config.model_dump())

    async def chat_completions(self, request: web.Request) -> web.Response:
        # The arrival time is taken before anything else, so it is the time a rate limit would see.
        arrived = time.time()
        config = self.config
        body = await request.json()
        messages = body.get("messages") or []
        key = request_hash(messages)
        attempt = self.attempts.get(key, 0)
        self.attempts[key] = attempt + 1
        call: dict[str, Any] = {
            "arrived": arrived, "answered": None, "hash": key, "attempt": attempt,
            "status": 200, "kind": "ok", "retry_after": None, "chunk": None,
        }
        self.calls.append(call)
        rng = random.Random(f"{config.seed}:{key}:{attempt}")
        latency = max(0.0, config.latency_mean_s + rng.uniform(-config.latency_jitter_s, config.latency_jitter_s))
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()

        response = await self._answer(config, rng, body, messages, key, attempt, presented, latency, call)
        call["status"] = response.status
        call["answered"] = time.time()
        return response

    async def _answer(
        self, config: FakeConfig, rng: random.Random, body: dict[str, Any], messages: list[Any], key: str,
        attempt: int, presented: str, latency: float, call: dict[str, Any],
    ) -> web.Response:
        if config.require_api_key is not None and presented != config.require_api_key:
            call["kind"] = "unauthorized"
            return _error(401, f"Incorrect API key provided: {presented}. You can find your API key in your "
                               "account settings.", "invalid_api_key")
        # Draw every decision, used or not, so one setting does not shift the others' outcomes.
        draw_429, draw_5xx, draw_malformed = rng.random(), rng.random(), rng.random()
        kind: MalformedKind = rng.choice(config.malformed_kinds) if config.malformed_kinds else "prose"
        if draw_429 < config.rate_429:
            # A real provider refuses at once; the latency applies to work it accepted.
            call["kind"], call["retry_after"] = "rate_limited", config.retry_after_s
            return _error(429, "Rate limit reached for requests. Please try again later.", "rate_limit_exceeded",
                          headers=_retry_after_headers(config.retry_after_s))
        await asyncio.sleep(latency)
        if draw_5xx < config.rate_5xx:
            call["kind"] = "server_error"
            detail = f" (request made with key {presented})" if config.echo_key_in_5xx else ""
            return _error(500, f"The server had an error while processing your request{detail}.", "server_error")
        try:
            # The extraction and the token counts take milliseconds of CPU: off the event loop, so the
            # arrival times of the requests that come meanwhile are taken when they arrive, not in a bunch.
            content, finish_reason, prompt_tokens, completion_tokens = await asyncio.to_thread(
                _complete, config, messages, draw_malformed, kind, call
            )
        except PromptFormatError as exc:
            call["kind"] = "bad_request"
            return _error(400, f"not a lumikb extraction prompt: {exc}", "invalid_request_error")
        return web.json_response({
            "id": f"chatcmpl-{key}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model", "gpt-4o-mini")),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        })


def _complete(
    config: FakeConfig, messages: list[Any], draw_malformed: float, kind: MalformedKind, call: dict[str, Any]
) -> tuple[str, str, int, int]:
    """The answer to an extraction prompt (by the offline model's rules, malformed when drawn so) and
    the usage a provider would report: (content, finish_reason, prompt tokens, completion tokens)."""
    schema, text, known = read_prompt_request(messages)
    call["chunk"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    answer = heuristic.extract(schema, text, known)
    finish_reason = "stop"
    if draw_malformed < config.malformed_rate:
        call["kind"] = kind
        content, finish_reason = _malform(kind, answer, config.truncate_at)
    else:
        content = json.dumps(answer, ensure_ascii=False)
    # Counted like OpenAI counts (cl100k_base and the chat format's framing), as a provider reports usage.
    prompt_tokens = chat_prompt_tokens([m for m in messages if isinstance(m, dict)])
    return content, finish_reason, prompt_tokens, count_tokens(content)


def _malform(kind: MalformedKind, answer: dict[str, Any], truncate_at: float) -> tuple[str, str]:
    """A bad answer of `kind` derived from the good one; returns (content, finish_reason)."""
    good = json.dumps(answer, ensure_ascii=False)
    if kind == "truncated":
        return good[: max(1, int(len(good) * truncate_at))], "length"
    if kind == "prose":
        names = ", ".join(e["name"] for e in answer["entities"][:3]) or "nothing of note"
        return f"Sure! This text mentions {names}. Let me know if you need anything else.", "stop"
    if kind == "empty":
        return "", "stop"
    if kind == "malformed_json":
        # Defects that models really produce and a repair step can undo: a code fence, single
        # quotes, trailing commas.
        text = json.dumps(answer, ensure_ascii=False, indent=1).replace('"', "'")
        return "```json\n" + text.replace("\n ]", ",\n ]").replace("\n}", ",\n}") + "\n```", "stop"
    if kind == "unknown_types":
        entities = [dict(e) for e in answer["entities"]]
        relationships = [dict(r) for r in answer["relationships"]]
        for entity in entities[::2]:
            entity["type"] = "Spaceship"
        for relationship in relationships[::2]:
            relationship["type"] = "ORBITS"
        return json.dumps({"entities": entities, "relationships": relationships}), "stop"
    # bad_endpoints: swap each relationship's ends, which the schema's direction usually forbids.
    relationships = [
        {**r, "source": r["target"], "source_type": r["target_type"], "target": r["source"],
         "target_type": r["source_type"]}
        for r in answer["relationships"]
    ]
    return json.dumps({"entities": answer["entities"], "relationships": relationships}), "stop"


def _retry_after_headers(seconds: float) -> dict[str, str]:
    # `Retry-After` is whole seconds by the HTTP spec; OpenAI also sends the exact value in milliseconds.
    return {"Retry-After": str(math.ceil(seconds)), "retry-after-ms": str(int(seconds * 1000))}


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": code, "param": None, "code": code}}, status=status, headers=headers
    )


def raise_priority(pid: int) -> None:
    """Let a fake server process run before the machine's other work (when allowed: root may).

    The fake server plays a provider, whose clock and CPUs are not ours: tests and benchmarks that
    count calls per second at the server need its arrival times to be when requests really arrive,
    not when a busy machine got round to running the server. So the server gets the lowest
    real-time priority (`SCHED_FIFO` 1, every thread): it runs as soon as a request wakes it. It is
    idle most of the time (a few ms of CPU per call), and Linux keeps 5% of every second for other
    work anyway (`sched_rt_runtime_us`).

    Measured on the 2-core test machine, 2026-11-30, at 20 calls/s through the whole stack: at
    normal priority the server stamped 21 calls within 0.81-0.92 s, although slots 21 apart are
    1.053 s apart and requests were written at most about 44 ms after their slot; at real-time
    priority, 1.009-1.017 s (docs/benchmarks.md). Where that is not allowed, `nice -10`.
    """
    try:
        for thread in os.listdir(f"/proc/{pid}/task"):
            os.sched_setscheduler(int(thread), os.SCHED_FIFO, os.sched_param(1))
        return
    except (AttributeError, OSError):
        pass  # not Linux, not allowed, or gone
    try:
        os.setpriority(os.PRIO_PROCESS, pid, -10)
    except OSError:
        pass  # not root: the server keeps normal priority, and its arrival times are less exact


def warm_up() -> None:
    """Answer one prompt before serving: first-time work would otherwise stall the server at its first
    answers and stamp the requests arriving meanwhile late, in a bunch (arrival times are what tests
    check). Pydantic and regexes, and tiktoken's encoding (about 0.3 s holding the GIL)."""
    from lumikb_pipeline.domain.schema import DomainSchema, EntityType
    from lumikb_pipeline.llm.prompt import build_messages

    schema = DomainSchema(entity_types=(EntityType(name="Organization", description="A company."),))
    messages = build_messages(schema, "Acme Corp hired Jane Doe in Berlin.")
    request_hash(messages)
    json.dumps(heuristic.extract(*read_prompt(messages)))
    count_tokens("warm-up")


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, FakeConfig]:
    parser = argparse.ArgumentParser(prog="lumikb-fake-llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    parser.add_argument("--latency-mean", type=float, default=0.0, help="seconds")
    parser.add_argument("--latency-jitter", type=float, default=0.0, help="seconds, uniform ± around the mean")
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of requests answered 429")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of 429s, seconds")
    parser.add_argument("--rate-5xx", type=float, default=0.0, help="share of requests answered 500")
    parser.add_argument("--malformed-rate", type=float, default=0.0, help="share of answers that are malformed")
    parser.add_argument("--malformed-kinds", default=",".join(MALFORMED_KINDS),
                        help=f"comma-separated, from {', '.join(MALFORMED_KINDS)}")
    parser.add_argument("--truncate-at", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--require-api-key", default=None)
    parser.add_argument("--echo-key-in-5xx", action="store_true")
    args = parser.parse_args(argv)
    config = FakeConfig(
        latency_mean_s=args.latency_mean, latency_jitter_s=args.latency_jitter, rate_429=args.rate_429,
        retry_after_s=args.retry_after, rate_5xx=args.rate_5xx, malformed_rate=args.malformed_rate,
        malformed_kinds=[k.strip() for k in args.malformed_kinds.split(",") if k.strip()],
        truncate_at=args.truncate_at, seed=args.seed, require_api_key=args.require_api_key,
        echo_key_in_5xx=args.echo_key_in_5xx,
    )
    return args, config


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server until interrupted; the first line printed is `listening on http://HOST:PORT`."""
    args, config = _parse_args(argv)
    # Bind first so a free port (--port 0) is known before the line that announces it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    warm_up()
    # Listening before the announcement: a client that connects at once waits in the backlog until
    # the app accepts, instead of being refused.
    sock.listen(1024)
    print(f"listening on http://{host}:{port}", flush=True)
    web.run_app(FakeLLM(config).app(), sock=sock, print=None, access_log=None, backlog=1024)


if __name__ == "__main__":
    main(sys.argv[1:])
