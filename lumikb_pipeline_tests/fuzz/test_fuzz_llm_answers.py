"""Fuzz: whatever the model answers ends as a validated contribution or a per-item (or per-answer)
rejection with a reason, and what is kept writes to the embedded store with the invariants intact."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lumikb_pipeline.domain.results import ChunkExtraction, GraphChunk
from lumikb_pipeline.domain.schema import ENTITY_TYPE_PATTERN, parse_schema_text
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.store import check_invariants
from lumikb_pipeline.llm.parse import MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, UnusableAnswer, parse_answer
from lumikb_pipeline_tests.fuzz.strategies import hostile_text, json_values

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]  # the slow step: the fast one stays under 5 minutes

SCHEMA = parse_schema_text("""
entity_types: [{name: Person}, {name: Organization}, {name: Place}]
relationship_types:
  - {name: WORKS_AT, source: [Person], target: [Organization]}
  - {name: LOCATED_IN, source: [Organization, Person], target: [Place]}
""")
TYPES = ["Person", "Organization", "Place", "person", "ORGANIZATION", "Thing", "WORKS_AT", "LOCATED_IN", "MENTIONS"]
field_value = st.one_of(hostile_text, st.sampled_from(TYPES), st.sampled_from(["Jane Doe", "Acme", "Berlin"]),
                        json_values)
entity = st.fixed_dictionaries({}, optional={"name": field_value, "type": field_value, "description": field_value})
relationship = st.fixed_dictionaries({}, optional={
    key: field_value for key in ("source", "source_type", "target", "target_type", "type", "description")
})
answer_object = st.fixed_dictionaries({}, optional={
    "entities": st.one_of(st.lists(st.one_of(entity, json_values), max_size=6), json_values),
    "relationships": st.one_of(st.lists(st.one_of(relationship, json_values), max_size=6), json_values),
    "extra": json_values,
})


def _render(data: Any, style: int) -> str:
    text = json.dumps(data, ensure_ascii=style % 2 == 0)
    if style == 2:
        return f"Here you go:\n```json\n{text}\n```"
    if style == 3:
        return text[: max(1, len(text) * 2 // 3)]  # cut off
    return text


def _check(parsed_or_error: Any) -> None:
    if isinstance(parsed_or_error, UnusableAnswer):
        assert parsed_or_error.code and parsed_or_error.message
        return
    for item in parsed_or_error.entities:
        assert item.type in SCHEMA.entity_type_names and ENTITY_TYPE_PATTERN.match(item.type)
        assert item.name.strip() and len(item.name) <= MAX_NAME_CHARS and len(item.description) <= MAX_DESCRIPTION_CHARS
        item.name.encode("utf-8"), item.description.encode("utf-8")
    for rel in parsed_or_error.relationships:
        assert SCHEMA.allows_relationship(rel.type, rel.source_type, rel.target_type)
    for dropped in parsed_or_error.dropped:
        assert dropped.reason and len(dropped.detail) < 1_200
        dropped.detail.encode("utf-8")


def _parse(content: str, finish_reason: str | None) -> Any:
    try:
        return parse_answer(content, SCHEMA, finish_reason)
    except UnusableAnswer as exc:
        return exc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(answer_object, json_values), style=st.integers(0, 3),
       finish_reason=st.sampled_from([None, "stop", "length"]))
def test_every_answer_is_a_validated_result_or_a_rejection_with_a_reason(data: Any, style: int,
                                                                         finish_reason: str | None) -> None:
    _check(_parse(_render(data, style), finish_reason))


@settings(max_examples=150, deadline=None)
@given(content=st.one_of(hostile_text, st.text(max_size=300)))
def test_any_text_as_an_answer_is_a_result_or_a_rejection(content: str) -> None:
    _check(_parse(content, None))


_store_dir = tempfile.TemporaryDirectory(prefix="lumikb-fuzz-graph-")
_store = EmbeddedGraphStore(Path(_store_dir.name) / "graph.sqlite3")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.lists(answer_object, min_size=1, max_size=3), mode=st.sampled_from(["replace", "merge"]),
       doc=st.integers(0, 3))
def test_what_is_kept_writes_to_the_embedded_store_with_the_graph_invariants_intact(
    answers: list[Any], mode: str, doc: int
) -> None:
    doc_id = f"doc-{doc}"
    chunks = [GraphChunk(id=f"{doc_id}:{i}", ordinal=i) for i in range(len(answers))]
    extractions = []
    for chunk, data in zip(chunks, answers, strict=True):
        result = _parse(json.dumps(data), None)
        if isinstance(result, UnusableAnswer):
            continue
        extractions.append(ChunkExtraction(chunk_id=chunk.id, entities=result.entities,
                                           relationships=result.relationships, dropped=result.dropped))
    graph = build_document_graph("fuzz", doc_id, 1, chunks, extractions)
    _store.write_document(graph, SCHEMA, mode)  # type: ignore[arg-type]
    for report in check_invariants(_store, "fuzz"):
        assert report.ok, report
