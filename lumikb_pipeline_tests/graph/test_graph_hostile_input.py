"""Hostile names and descriptions are stored literally or rejected clearly; nothing else changes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lumikb_pipeline.core.errors import SchemaViolation
from lumikb_pipeline.domain.keys import MAX_KEY_LENGTH, normalise_key
from lumikb_pipeline.domain.results import DocumentGraph, EntityRef, GraphChunk, GraphEntity, GraphRelationship
from lumikb_pipeline.domain.schema import DomainSchema, EntityType, RelationshipType
from lumikb_pipeline.graph.store import GraphStore, InvalidDocumentGraph, check_invariants
from lumikb_pipeline_tests.graph.factories import SCHEMA, doc_graph

HOSTILE = {
    "quotes": "O'Reilly \"Media\" Ltd",
    "backticks": "`Acme` Corp``",
    "cypher-injection": "'}) DETACH DELETE n //",
    "cypher-injection-2": '"}) MATCH (n) DETACH DELETE n RETURN 1 //',
    "parameter-lookalike": "$kb_id {kb_id: 'other-kb'}",
    "sql-injection": "Robert'); DROP TABLE entities;--",
    "newlines": "First line\nsecond line\r\nthird\ttab",
    "emoji": "Rocket 🚀 Co 👩‍🔬🏳️‍🌈",
    "right-to-left": "שלום עולם شركة",
    "bidi-override": "\u202eevil\u202c Corp",
    "backslashes": "C:\\Program Files\\ \\\\server",
    "nul-byte": "nul\x00byte",
    "10kB": "Long " + "x" * 10_240,
}


def hostile_graph(kb_id: str, text: str, doc_id: str = "doc") -> DocumentGraph:
    """A document whose organization is named and described by `text`, employing one person, with the
    relationship described by `text` too."""
    org = EntityRef(type="Organization", key=normalise_key(text))
    person = EntityRef(type="Person", key="ann")
    chunk = f"{doc_id}:0"
    return DocumentGraph(
        kb_id=kb_id, doc_id=doc_id, schema_version=1, chunks=[GraphChunk(id=chunk, ordinal=0)],
        entities=[
            GraphEntity(type=org.type, key=org.key, name=text, description=text, chunk_ids=[chunk]),
            GraphEntity(type="Person", key="ann", name="Ann", description="", chunk_ids=[chunk]),
        ],
        relationships=[GraphRelationship(type="EMPLOYS", source=org, target=person, description=text,
                                         chunk_ids=[chunk])],
    )


@pytest.fixture
def sentinel(graph_store: GraphStore, new_kb_factory: Callable[[], str]) -> Callable[[], None]:
    """Another KB with ordinary content; calling the result asserts it is exactly as it was."""
    kb_id = new_kb_factory()
    graph_store.write_document(doc_graph(kb_id, "s", [(
        [("Acme Corp", "Organization", "A company."), ("Ann", "Person")],
        [("Acme Corp", "Organization", "EMPLOYS", "Ann", "Person")],
    )]), SCHEMA, "replace")
    before = graph_store.dump(kb_id)

    def unchanged() -> None:
        assert graph_store.dump(kb_id) == before
        for report in check_invariants(graph_store, kb_id):
            assert report.ok, report

    return unchanged


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_names_and_descriptions_are_stored_literally(
    graph_store: GraphStore, kb_id: str, sentinel: Callable[[], None], text: str
) -> None:
    graph = hostile_graph(kb_id, text)
    graph_store.write_document(graph, SCHEMA, "replace")
    first = graph_store.dump(kb_id)
    graph_store.write_document(graph, SCHEMA, "replace")
    assert graph_store.dump(kb_id) == first

    [org] = [n["properties"] for n in first.nodes if n["properties"].get("type") == "Organization"]
    assert org["name"] == text and org["description"] == text
    assert org["key"] == normalise_key(text) and 0 < len(org["key"]) <= MAX_KEY_LENGTH
    [employs] = [r["properties"] for r in first.relationships if r["type"] == "EMPLOYS"]
    assert employs["description"] == text
    mentions = [r["properties"] for r in first.relationships if r["type"] == "MENTIONS"]
    assert {"names": [text], "descriptions": [text]} in mentions
    assert graph_store.counts(kb_id).model_dump() == {
        "documents": 1, "chunks": 1, "entities": 2, "relationships": 1, "mentions": 2,
    }
    sentinel()


def test_hostile_document_and_chunk_ids_are_values_too(
    graph_store: GraphStore, kb_id: str, sentinel: Callable[[], None]
) -> None:
    doc_id = "'}) DETACH DELETE n // \"; DROP TABLE chunks;--"
    graph = hostile_graph(kb_id, "Acme", doc_id=doc_id)
    graph_store.write_document(graph, SCHEMA, "replace")
    assert graph_store.document_counts(kb_id, doc_id).chunks == 1
    graph_store.remove_document(kb_id, doc_id)
    assert graph_store.counts(kb_id).documents == 0
    sentinel()


def test_hostile_names_through_build_keep_their_text_with_whitespace_collapsed(
    graph_store: GraphStore, kb_id: str, sentinel: Callable[[], None]
) -> None:
    names = [text for text in HOSTILE.values() if normalise_key(text)]
    graph = doc_graph(kb_id, "d", [([(text, "Organization", text) for text in names], [])])
    graph_store.write_document(graph, SCHEMA, "replace")
    stored = {n["properties"]["name"] for n in graph_store.dump(kb_id).nodes if "name" in n["properties"]}
    assert stored == {" ".join(text.split()) for text in names}
    sentinel()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda g: g.entities[0].__setattr__("name", "lone \ud800 surrogate"), InvalidDocumentGraph,
         "not valid Unicode text"),
        (lambda g: g.entities[0].__setattr__("description", "x" * 100_000), InvalidDocumentGraph,
         "100000 characters long; at most 65536"),
        (lambda g: g.__setattr__("kb_id", "x'}) DETACH DELETE n //"), InvalidDocumentGraph,
         "is not a valid KB slug"),
        (lambda g: g.entities[0].__setattr__("type", "Organization`) DETACH DELETE n //"), SchemaViolation,
         "entity type 'Organization`\\) DETACH DELETE n //' is not in the schema"),
        (lambda g: g.relationships[0].__setattr__("type", "EMPLOYS]->() DETACH DELETE n //"), SchemaViolation,
         "relationship type 'EMPLOYS\\]->\\(\\) DETACH DELETE n //' is not in the schema"),
    ],
    ids=["lone-surrogate", "100kB-description", "kb-slug", "entity-type", "relationship-type"],
)
def test_hostile_input_that_cannot_be_stored_is_rejected_and_nothing_changes(
    graph_store: GraphStore,
    kb_id: str,
    sentinel: Callable[[], None],
    change: Callable[[DocumentGraph], None],
    error: type[Exception],
    message: str,
) -> None:
    graph = hostile_graph(kb_id, "Acme")
    change(graph)
    with pytest.raises(error, match=message):
        graph_store.write_document(graph, SCHEMA, "replace")
    assert graph_store.counts(kb_id).documents == 0
    sentinel()


def test_a_malicious_type_inside_a_schema_built_in_code_is_rejected(
    graph_store: GraphStore, kb_id: str, sentinel: Callable[[], None]
) -> None:
    evil = "EMPLOYS]->(x) DETACH DELETE x //"
    schema = DomainSchema(
        entity_types=SCHEMA.entity_types,
        relationship_types=(RelationshipType(name=evil, source=("Organization",), target=("Person",)),),
    )
    graph = hostile_graph(kb_id, "Acme")
    graph.relationships[0].type = evil
    with pytest.raises(SchemaViolation, match="does not match"):
        graph_store.write_document(graph, schema, "replace")
    evil_entity_schema = DomainSchema(entity_types=(*SCHEMA.entity_types, EntityType(name="X`) //")))
    graph = hostile_graph(kb_id, "Acme")
    graph.entities[1].type = "X`) //"
    graph.relationships.clear()
    with pytest.raises(SchemaViolation, match="does not match"):
        graph_store.write_document(graph, evil_entity_schema, "replace")
    assert graph_store.counts(kb_id).documents == 0
    sentinel()
