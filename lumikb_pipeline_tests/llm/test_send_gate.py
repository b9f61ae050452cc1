"""The send gate: a prepared request leaves from the sender thread at its slot, or not at all."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2
import pytest

from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm.prompt import build_messages
from lumikb_pipeline.llm.send_gate import GatedTransport, SendGate, SlotMissed, current_gate
from lumikb_pipeline_tests.fake_llm import FakeServer


async def post_through_gate(server: FakeServer, gate: SendGate, body: dict[str, object]) -> httpx2.Response:
    async with httpx2.AsyncClient(transport=GatedTransport(4, 4)) as client:
        token = current_gate.set(gate)
        try:
            return await client.post(f"{server.api_base}/chat/completions", content=json.dumps(body))
        finally:
            current_gate.reset(token)


def test_a_request_leaves_at_its_slot_not_when_it_was_made(fake_llm: FakeServer, schema_v1: DomainSchema) -> None:
    body = {"model": "m", "messages": build_messages(schema_v1, "Acme Corp hired Jane Doe.")}

    async def main() -> tuple[float, SendGate, int]:
        # A generous tolerance: this checks when the request leaves, not how busy the machine is.
        gate = SendGate(due=time.monotonic() + 0.3, tolerance_s=0.05)
        due_wall = time.time() + 0.3
        response = await post_through_gate(fake_llm, gate, body)
        return due_wall, gate, response.status_code

    due_wall, gate, status = asyncio.run(main())

    [call] = fake_llm.calls()
    assert status == 200 and gate.sent and not gate.missed
    assert 0 <= call["arrived"] - due_wall < 0.06


def test_a_request_that_reaches_its_slot_too_late_is_not_sent(fake_llm: FakeServer, schema_v1: DomainSchema) -> None:
    body = {"model": "m", "messages": build_messages(schema_v1, "Acme Corp hired Jane Doe.")}
    gate = SendGate(due=time.monotonic() - 0.05, tolerance_s=0.01)

    with pytest.raises(SlotMissed):
        asyncio.run(post_through_gate(fake_llm, gate, body))

    assert gate.missed and not gate.sent
    assert fake_llm.calls() == []
