"""The fake LLM server: OpenAI-shaped answers, configurable misbehaviour, deterministic by seed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm.prompt import build_messages
from lumikb_pipeline_tests.fake_llm import FakeServer


def post(server: FakeServer, messages: list[dict[str, str]]) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"model": "gpt-4o-mini", "messages": messages}).encode()
    request = urllib.request.Request(f"{server.api_base}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer sk-x"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.load(error)


def test_the_fake_server_answers_like_openai_from_the_prompt(fake_llm: FakeServer, schema_v1: DomainSchema) -> None:
    status, _, body = post(fake_llm, build_messages(schema_v1, "Acme Corp hired Dr. Jane Doe in Berlin."))

    assert status == 200
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert {e["type"] for e in answer["entities"]} == {"Organization", "Person", "Location"}
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
    assert [c["status"] for c in fake_llm.calls()] == [200]


def test_misbehaviour_is_configurable_at_run_time_and_deterministic_by_seed(
    fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    fake_llm.configure(rate_429=0.3, rate_5xx=0.2, malformed_rate=0.3, retry_after_s=2, seed=11)
    prompts = [build_messages(schema_v1, f"Acme Corp {i} hired Jane Doe.") for i in range(30)]

    first = [(post(fake_llm, m)[0], post(fake_llm, m)[0]) for m in prompts]
    first_kinds = [c["kind"] for c in fake_llm.calls()]
    fake_llm.reset()
    second = [(post(fake_llm, m)[0], post(fake_llm, m)[0]) for m in prompts]

    assert first == second and first_kinds == [c["kind"] for c in fake_llm.calls()]
    statuses = [s for pair in first for s in pair]
    assert {200, 429, 500} <= set(statuses)
    assert {"ok", "rate_limited", "server_error"} < set(first_kinds) and len(set(first_kinds)) >= 5
    # A request's retry (same messages) has its own fate: attempt numbers count the arrivals.
    assert {c["attempt"] for c in fake_llm.calls()} == {0, 1}


def test_a_429_carries_retry_after(fake_llm: FakeServer, schema_v1: DomainSchema) -> None:
    fake_llm.configure(rate_429=1.0, retry_after_s=1.5)

    status, headers, body = post(fake_llm, build_messages(schema_v1, "Acme Corp."))

    assert status == 429 and headers["Retry-After"] == "2" and headers["retry-after-ms"] == "1500"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert fake_llm.calls()[0]["retry_after"] == 1.5


def test_each_malformed_kind_has_its_shape(fake_llm: FakeServer, schema_v1: DomainSchema) -> None:
    messages = build_messages(schema_v1, "Acme Corp hired Dr. Jane Doe in Berlin.")
    contents = {}
    for kind in ("malformed_json", "truncated", "prose", "empty", "unknown_types", "bad_endpoints"):
        fake_llm.configure(malformed_rate=1.0, malformed_kinds=[kind])
        contents[kind] = post(fake_llm, messages)[2]["choices"][0]

    assert contents["truncated"]["finish_reason"] == "length"
    assert contents["empty"]["message"]["content"] == ""
    assert "{" not in contents["prose"]["message"]["content"]
    assert contents["malformed_json"]["message"]["content"].startswith("```json")
    assert "Spaceship" in contents["unknown_types"]["message"]["content"]
    swapped = json.loads(contents["bad_endpoints"]["message"]["content"])["relationships"][0]
    assert swapped["source_type"] != "Organization" or swapped["type"] != "EMPLOYS"
