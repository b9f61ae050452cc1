"""The send gate: a prepared request leaves from the sender thread at its slot, or not at all."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx2
import pytest

from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm.prompt import build_messages
from lumikb_pipeline.llm.send_gate import STOPPED, GatedTransport, SendGate, SlotMissed, current_gate
from lumikb_pipeline_tests.fake_llm import FakeServer
from lumikb_pipeline_tests.llm.priority import allowed_in_a_new_thread


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

    assert gate.missed and not gate.sent and gate.missed_at == "reached the sender late"
    assert fake_llm.calls() == []


def test_a_request_whose_call_was_stopped_before_its_slot_is_not_sent(
    fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    """A call enters LiteLLM up to the lead (1 s) before its slot: a cancel seen in the meantime is
    asked once more at the slot, so the request does not go out."""
    body = {"model": "m", "messages": build_messages(schema_v1, "Acme Corp hired Jane Doe.")}
    stop = threading.Event()
    gate = SendGate(due=time.monotonic() + 0.3, tolerance_s=0.05, stopped=stop.is_set)
    threading.Timer(0.1, stop.set).start()

    with pytest.raises(SlotMissed):
        asyncio.run(post_through_gate(fake_llm, gate, body))

    assert gate.missed and not gate.sent and gate.missed_at == STOPPED
    assert fake_llm.calls() == []


def test_a_request_that_waits_for_a_connection_past_its_slot_is_not_sent(
    fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    """The check is made as the first byte goes out, not only when the sender wakes: with one
    connection, the second request waits for the first's answer (0.4 s), long after its slot."""
    fake_llm.configure(latency_mean_s=0.4)
    first = {"model": "m", "messages": build_messages(schema_v1, "Acme Corp hired Jane Doe.")}
    second = {"model": "m", "messages": build_messages(schema_v1, "Jane Doe moved to Berlin.")}

    async def post(client: httpx2.AsyncClient, gate: SendGate, body: dict[str, object]) -> int:
        token = current_gate.set(gate)
        try:
            return (await client.post(f"{fake_llm.api_base}/chat/completions", content=json.dumps(body))).status_code
        finally:
            current_gate.reset(token)

    async def main() -> tuple[SendGate, SendGate, list[object]]:
        now = time.monotonic()
        early, late = SendGate(due=now + 0.1, tolerance_s=0.05), SendGate(due=now + 0.15, tolerance_s=0.05)
        async with httpx2.AsyncClient(transport=GatedTransport(1, 1)) as client:
            results = await asyncio.gather(post(client, early, first), post(client, late, second),
                                           return_exceptions=True)
        return early, late, results

    early, late, results = asyncio.run(main())

    assert results[0] == 200 and early.sent
    assert isinstance(results[1], SlotMissed) and late.missed and not late.sent
    assert late.missed_at == "late at its first byte"
    assert late.late_s > 0.2  # it got the connection only when the first answer had been read
    assert len(fake_llm.calls()) == 1


def test_the_sender_thread_runs_at_real_time_priority_where_allowed() -> None:
    """The sender must run when its slot comes, however busy the machine: `SCHED_FIFO` 1 where the
    process may (root here, `rtprio: 1` in docker-compose), normal priority without an error elsewhere."""
    allowed = allowed_in_a_new_thread(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1)))
    GatedTransport(1, 1)  # starts the process's sender thread
    [sender] = [thread for thread in threading.enumerate() if thread.name == "lumikb-llm-sender"]
    deadline = time.monotonic() + 5
    while os.sched_getscheduler(sender.native_id) & ~os.SCHED_RESET_ON_FORK != os.SCHED_FIFO and allowed:
        assert time.monotonic() < deadline, "the sender thread never took real-time priority"
        time.sleep(0.01)
    policy = os.sched_getscheduler(sender.native_id) & ~os.SCHED_RESET_ON_FORK
    assert policy == (os.SCHED_FIFO if allowed else os.SCHED_OTHER)
    if allowed:
        assert os.sched_getscheduler(sender.native_id) & os.SCHED_RESET_ON_FORK  # not passed on
