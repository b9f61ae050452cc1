"""`lumikb/offline`: deterministic, typed by the schema it is given, fast, reachable through LiteLLM."""

from __future__ import annotations

import json

import litellm
import pytest

from lumikb_pipeline.domain.schema import DomainSchema, parse_schema_text
from lumikb_pipeline.llm.offline import OFFLINE_MODEL, OfflineLLM, register_offline_model
from lumikb_pipeline.llm.parse import parse_answer
from lumikb_pipeline.llm.prompt import build_messages

TEXT = ("Acme Corp hired Dr. Jane Doe in Berlin last year. The Bank of Nordland, based in Oslo, "
        "said Jane Doe would join its board. Meanwhile Globex Ltd. moved to Paris.")


def ask(schema: DomainSchema, text: str) -> str:
    register_offline_model()
    response = litellm.completion(model=OFFLINE_MODEL, messages=build_messages(schema, text), num_retries=0)
    return str(response.choices[0].message.content)


def test_the_offline_model_types_entities_by_the_schemas_descriptions(schema_v1: DomainSchema) -> None:
    parsed = parse_answer(ask(schema_v1, TEXT), schema_v1)

    types = {e.name: e.type for e in parsed.entities}
    assert types == {
        "Acme Corp": "Organization", "Jane Doe": "Person", "Berlin": "Location", "Bank of Nordland": "Organization",
        "Oslo": "Location", "Globex Ltd": "Organization", "Paris": "Location",
    }
    assert ("Acme Corp", "EMPLOYS", "Jane Doe") in {(r.source, r.type, r.target) for r in parsed.relationships}
    assert parsed.dropped == []  # everything it says fits the schema


def test_the_offline_model_is_deterministic_and_fits_any_schema() -> None:
    schema = parse_schema_text("""
entity_types:
  - name: Gene
  - name: Disease
    description: An illness or disorder.
relationship_types:
  - name: ASSOCIATED_WITH
    source: [Gene]
    target: [Disease]
""")

    first, second = ask(schema, TEXT), ask(schema, TEXT)

    assert first == second
    parsed = parse_answer(first, schema)
    assert parsed.entities and {e.type for e in parsed.entities} <= {"Gene", "Disease"}
    assert parsed.dropped == []
    assert all(schema.allows_relationship(r.type, r.source_type, r.target_type) for r in parsed.relationships)


def test_the_offline_model_reports_usage_and_costs_nothing(schema_v1: DomainSchema) -> None:
    register_offline_model()
    response = litellm.completion(model=OFFLINE_MODEL, messages=build_messages(schema_v1, TEXT), num_retries=0)

    assert response.usage.prompt_tokens > 100 and response.usage.completion_tokens > 10
    assert litellm.completion_cost(completion_response=response) == 0.0


def test_the_offline_model_answers_without_waiting_for_anything(schema_v1: DomainSchema) -> None:
    # No sleep, no I/O: the coroutine finishes on its first step (the demo's default must be fast).
    coroutine = OfflineLLM().acompletion(model="offline", messages=build_messages(schema_v1, TEXT))
    with pytest.raises(StopIteration) as finished:
        coroutine.send(None)

    assert json.loads(finished.value.value.choices[0].message.content)["entities"]
