"""Sending each HTTP request at its rate slot, after LiteLLM has prepared it, from an idle thread.

Between "the rate slot has come" and "the request leaves the process" LiteLLM, the OpenAI SDK and
httpx spend 5-15 ms of CPU, and the event loop that runs the calls is also busy with other calls'
answers (LiteLLM spends 10-20 ms on each). That time varies from call to call, and the variation
is what could put rate+1 calls into one second at the provider. So for providers reached through
the OpenAI SDK:

1. the extractor enters the call `lead_s` before its slot (`RateLimiter.slot(lead_s=...)`), with a
   `SendGate` (the slot's time) in a context variable, and gives LiteLLM an OpenAI client whose
   transport is a `GatedTransport`;
2. when the prepared request reaches the transport, it is handed to the process's *sender
   thread*, an event loop that does nothing else: it sleeps until the slot, checks it is not late,
   and sends. Its wake-ups are not delayed by the busy loop (only by the GIL, at most one switch
   interval). The last check is made from httpcore's `trace` hook just before the request's first
   byte is written, so a wait for a pooled connection counts too;
3. a request that reaches the sender, or its connection, after its slot (plus tolerance) is not
   sent (`SlotMissed`); the caller reserves another slot.

The answer is read completely in the sender thread and handed back as a new response (calls are
never streamed). The hooks are public APIs: LiteLLM's `client=` parameter, httpx transports and
httpcore's `trace` request extension.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

# The OpenAI SDK that LiteLLM drives is built on httpx2 (the successor of httpx, same API); its
# client only accepts httpx2 transports.
import httpx2 as httpx


@dataclass
class SendGate:
    """One call's slot: `due` on `time.monotonic()` (the clock of every asyncio loop here)."""

    due: float
    tolerance_s: float
    sent: bool = False
    missed: bool = False
    missed_at: str = ""  # where a missed slot was found late (for diagnosis), or STOPPED
    stopped: Callable[[], bool] | None = None  # asked at the slot: True, and the request is not sent
    late_s: float = 0.0  # how long after `due` its headers had been written (for diagnosis)


STOPPED = "stopped"
SWITCH_INTERVAL_S = 0.005  # Python's default, set so that no library lowers it under the sender

current_gate: contextvars.ContextVar[SendGate | None] = contextvars.ContextVar("lumikb_send_gate", default=None)


class SlotMissed(httpx.TransportError):
    """The request reached its slot too late (or was a second request for one slot); not sent."""


class _Sender:
    """The process's sender thread: an event loop with one HTTP transport per connection limit."""

    def __init__(self) -> None:
        # The switch interval is also how long the sender keeps the GIL, once it has it, while
        # another thread asks for it: from its slot check to the request's first byte it needs a
        # ms or two. Made to drop the GIL in between, it waits for a thread at normal priority that
        # a busy machine may not run, and its request leaves late after passing the check, bunched
        # with the next ones (likely what put 21 calls into 0.957 s at 1 ms; docs/llm.md). The wait
        # for the GIL on waking, up to one interval, comes before the check: at most a slot given up.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.loop = asyncio.new_event_loop()
        self.transports: dict[tuple[int, int], httpx.AsyncHTTPTransport] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, name="lumikb-llm-sender", daemon=True).start()

    def _serve(self) -> None:
        _run_before_other_work()
        self.loop.run_forever()

    def transport(self, limits: tuple[int, int]) -> httpx.AsyncHTTPTransport:
        """The transport for these connection limits, made now if needed (it builds an SSL context:
        tens of ms of CPU, which must not happen between a slot and its request)."""
        with self.lock:
            transport = self.transports.get(limits)
            if transport is None:
                transport = self.transports[limits] = httpx.AsyncHTTPTransport(
                    limits=httpx.Limits(max_connections=limits[0], max_keepalive_connections=limits[1])
                )
            return transport

    async def send(self, request: httpx.Request, gate: SendGate | None,
                   limits: tuple[int, int]) -> httpx.Response | None:
        """Send `request` at its gate's slot; None when the slot has passed. Runs in the sender loop."""
        if gate is not None:
            if self.loop.time() - gate.due > gate.tolerance_s:
                gate.missed_at = "reached the sender late"
                return None
            await asyncio.sleep(max(0.0, gate.due - self.loop.time()))
            if self.loop.time() - gate.due > gate.tolerance_s:
                gate.missed_at = "the sender woke late"
                return None
            if gate.stopped is not None and gate.stopped():
                gate.missed_at = STOPPED
                return None
            # The last check is made when the request's first byte is about to be written, after
            # the connection pool has handed out (or opened) a connection: waiting for one is time
            # the check at wake-up cannot see.
            request.extensions = {**request.extensions, "trace": self._checkpoint(gate)}
        try:
            response = await self.transport(limits).handle_async_request(request)
        except _TooLate:
            return None
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return httpx.Response(response.status_code, headers=response.headers, content=content,
                              extensions={k: v for k, v in response.extensions.items() if k == "http_version"})

    def _checkpoint(self, gate: SendGate) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
        """httpcore's `trace` hook for one gated request: the slot is checked as its headers go out."""

        async def trace(event: str, _info: dict[str, Any]) -> None:
            if event == "http11.send_request_headers.started" and not gate.sent:
                gate.late_s = self.loop.time() - gate.due
                if gate.late_s > gate.tolerance_s:
                    gate.missed_at = "late at its first byte"
                    raise _TooLate  # nothing written: httpcore closes the connection, no call is made
                gate.sent = True  # from here on the request counts as a call, whatever happens to it
            elif event == "http11.send_request_headers.complete":
                gate.late_s = self.loop.time() - gate.due

        return trace


def _run_before_other_work() -> None:
    """Give the calling thread (the sender) the lowest real-time priority, where allowed.

    The sender sleeps until each slot and must run then, whatever else the machine is doing (a run
    process starting, Neo4j, the step's own work): woken late, it gives the slot up. As `SCHED_FIFO`
    1 it runs as soon as it wakes, for the few ms of CPU a send takes; Linux keeps 5% of every second
    for other work anyway (`sched_rt_runtime_us`). Allowed for root, with `CAP_SYS_NICE`, or up to
    the process's `RLIMIT_RTPRIO` (docker-compose gives the workers `rtprio: 1`); elsewhere the
    sender keeps normal priority. `SCHED_RESET_ON_FORK`: threads it starts (DNS lookups) and forked
    processes do not inherit it.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed


class _TooLate(Exception):
    """Raised from the trace hook to stop a request before its first byte."""


_sender_lock = threading.Lock()
_sender: tuple[int, _Sender] | None = None


def _process_sender() -> _Sender:
    global _sender
    with _sender_lock:
        # A forked child inherits the variable but not the thread.
        if _sender is None or _sender[0] != os.getpid():
            _sender = (os.getpid(), _Sender())
        return _sender[1]


class GatedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request from the sender thread at its `SendGate`'s slot."""

    def __init__(self, max_connections: int, max_keepalive_connections: int) -> None:
        self.limits = (max_connections, max_keepalive_connections)
        _process_sender().transport(self.limits)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Hand the request to the sender thread and wait for its answer."""
        gate = current_gate.get()
        if gate is not None and gate.sent:
            # A second request in the same call (a redirect, say) would be a second call in one slot.
            raise SlotMissed("one rate slot allows one request")
        await request.aread()  # the body must be bytes before it crosses to the other loop
        sender = _process_sender()
        future: Future[httpx.Response | None] = asyncio.run_coroutine_threadsafe(
            sender.send(request, gate, self.limits), sender.loop
        )
        response = await asyncio.wrap_future(future)
        if response is None:
            assert gate is not None
            gate.missed = True
            raise SlotMissed(f"the request was not sent at its rate slot: {gate.missed_at}")
        response.request = request
        return response


async def _answer_no_content(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


async def _warm_up_sender() -> None:
    server = await asyncio.start_server(_answer_no_content, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(retries=0)) as client:
            await client.post(f"http://127.0.0.1:{port}/warm-up", content=b"{}")
    finally:
        server.close()
        await server.wait_closed()


def warm_up_sender() -> None:
    """Send one request to a throwaway server on this machine from the sender thread.

    The first request of a process runs code paths for the first time (the HTTP stack's lazy
    set-up): done during a real call, that delays the call past its slot.
    """
    sender = _process_sender()
    asyncio.run_coroutine_threadsafe(_warm_up_sender(), sender.loop).result(timeout=30)
