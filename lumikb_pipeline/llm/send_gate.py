"""Holding an HTTP request back until its rate slot, *after* LiteLLM has prepared it.

Between "the caller's rate slot has come" and "the request leaves the process" LiteLLM, the OpenAI
SDK and httpx spend 5-15 ms of CPU, more when the machine is busy. That time varies from call to
call, and the variation is what could put rate+1 calls into one second at the provider. So for
providers reached through the OpenAI SDK, the extractor enters the call a little before its slot
(`RateLimiter.slot(lead_s=...)`) with a `SendGate` in a context variable, and gives LiteLLM an
OpenAI client whose httpx transport (`GatedTransport`) waits for the slot at the last moment, right
before the bytes are written. A request that reaches the gate too late is not sent at all
(`SlotMissed`); the caller reserves another slot.

Both pieces are public APIs: LiteLLM's `client=` parameter and httpx's custom transports.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass

# The OpenAI SDK that LiteLLM drives is built on httpx2 (the successor of httpx, same API); its
# client only accepts httpx2 transports.
import httpx2 as httpx


@dataclass
class SendGate:
    """One call's slot: `due` on the event loop's clock, and whether the request went out."""

    due: float
    tolerance_s: float
    sent: bool = False
    missed: bool = False


current_gate: contextvars.ContextVar[SendGate | None] = contextvars.ContextVar("lumikb_send_gate", default=None)


class SlotMissed(httpx.TransportError):
    """The request reached its gate after the slot (plus tolerance); it was not sent."""


class GatedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that waits for the current `SendGate`'s slot before sending."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Wait until the gate's slot, refuse if it has passed, then send through `inner`."""
        gate = current_gate.get()
        if gate is not None:
            if gate.sent:
                # A second request in the same call (a redirect, say) would be a second call.
                raise SlotMissed("one rate slot allows one request")
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, gate.due - loop.time()))
            if loop.time() - gate.due > gate.tolerance_s:
                gate.missed = True
                raise SlotMissed("the request reached its rate slot too late and was not sent")
            gate.sent = True
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.inner.aclose()
