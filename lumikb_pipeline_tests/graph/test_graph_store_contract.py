"""The graph-store contract (PRODUCT.md section 2), run against Neo4j and the embedded store alike."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from lumikb_pipeline.core.errors import SchemaViolation
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph, EntityRef, GraphChunk, GraphEntity, GraphRelationship
from lumikb_pipeline.domain.schema import DomainSchema, EntityType
from lumikb_pipeline.graph.store import GraphStore, InvalidDocumentGraph, check_invariants
from lumikb_pipeline_tests.graph.factories import SCHEMA, doc_graph, without_kb

ACME = EntityRef(type="Organization", key="acme corp")
ANN = EntityRef(type="Person", key="ann lee")


def acme_doc(kb_id: str, doc_id: str, description: str = "") -> DocumentGraph:
    """A document naming Acme Corp, Ann Lee, the EMPLOYS between them, and one entity of its own."""
    return doc_graph(kb_id, doc_id, [
        ([("Acme Corp", "Organization", description), (f"Own {doc_id}", "Organization")], []),
        ([], [("Acme Corp", "Organization", "EMPLOYS", "Ann Lee", "Person", f"said by {doc_id}")]),
    ])


def without_acme(kb_id: str, doc_id: str) -> DocumentGraph:
    """The same document re-extracted: Acme (and so the EMPLOYS) is no longer found."""
    return doc_graph(kb_id, doc_id, [([(f"Own {doc_id}", "Organization")], []), ([], [])])


def entity_props(store: GraphStore, kb_id: str) -> dict[tuple[str, str], dict[str, object]]:
    return {
        (n["properties"]["type"], n["properties"]["key"]): n["properties"]
        for n in store.dump(kb_id).nodes
        if n["labels"] == ["Entity"]
    }


def relationship_props(store: GraphStore, kb_id: str, rel_type: str) -> list[dict[str, object]]:
    return [r["properties"] for r in store.dump(kb_id).relationships if r["type"] == rel_type]


def assert_invariants_hold(store: GraphStore, kb_id: str) -> None:
    for report in check_invariants(store, kb_id):
        assert report.count == 0, report


# --- idempotency -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replace", "merge"])
def test_writing_the_same_document_twice_leaves_an_identical_graph(
    graph_store: GraphStore, kb_id: str, mode: WriteMode
) -> None:
    graph_store.write_document(acme_doc(kb_id, "a", "Makes rockets."), SCHEMA, mode)
    graph_store.write_document(acme_doc(kb_id, "b", "Based in Ohio."), SCHEMA, mode)
    first = graph_store.dump(kb_id)

    summary = graph_store.write_document(acme_doc(kb_id, "a", "Makes rockets."), SCHEMA, mode)
    graph_store.write_document(acme_doc(kb_id, "b", "Based in Ohio."), SCHEMA, mode)
    graph_store.write_document(acme_doc(kb_id, "a", "Makes rockets."), SCHEMA, mode)

    assert graph_store.dump(kb_id) == first
    assert (summary.entities_created, summary.entities_deleted, summary.relationships_created) == (0, 0, 0)
    assert_invariants_hold(graph_store, kb_id)


def test_the_graph_does_not_depend_on_the_order_of_writes(
    graph_store: GraphStore, new_kb_factory: Callable[[], str]
) -> None:
    forward, backward = new_kb_factory(), new_kb_factory()
    docs = ["a", "b", "c"]
    for doc in docs:
        graph_store.write_document(acme_doc(forward, doc, f"Seen in {doc}."), SCHEMA, "replace")
    for doc in reversed(docs):
        graph_store.write_document(acme_doc(backward, doc, f"Seen in {doc}."), SCHEMA, "replace")
    assert without_kb(graph_store.dump(forward), forward) == without_kb(graph_store.dump(backward), backward)
    acme = entity_props(graph_store, forward)[("Organization", "acme corp")]
    assert acme["description"] == "Seen in a.\nSeen in b.\nSeen in c."


# --- replace and merge -------------------------------------------------------------------------


def test_replace_reextraction_removes_only_this_documents_contribution(graph_store: GraphStore, kb_id: str) -> None:
    graph_store.write_document(acme_doc(kb_id, "a", "From A."), SCHEMA, "replace")
    graph_store.write_document(acme_doc(kb_id, "b", "From B."), SCHEMA, "replace")

    summary = graph_store.write_document(without_acme(kb_id, "a"), SCHEMA, "replace")

    entities = entity_props(graph_store, kb_id)
    assert ("Organization", "acme corp") in entities  # B still provides Acme
    assert entities[("Organization", "acme corp")]["description"] == "From B."  # A's text went with A
    [employs] = relationship_props(graph_store, kb_id, "EMPLOYS")
    assert employs["chunk_ids"] == ["b:1"]  # A's provenance removed, B's kept
    assert employs["description"] == "said by b"
    mentions_of_acme = [
        r for r in graph_store.dump(kb_id).relationships if r["type"] == "MENTIONS" and "acme corp" in r["end"]
    ]
    assert {m["start"].split(",")[-1].strip(' "]') for m in mentions_of_acme} == {"b:0", "b:1"}
    assert (summary.entities_deleted, summary.relationships_deleted) == (0, 0)
    assert summary.mentions_removed == 3  # a:0 and a:1 -> Acme, a:1 -> Ann

    graph_store.write_document(without_acme(kb_id, "b"), SCHEMA, "replace")

    entities = entity_props(graph_store, kb_id)
    assert ("Organization", "acme corp") not in entities  # no provenance left anywhere
    assert ("Person", "ann lee") not in entities
    assert set(entities) == {("Organization", "own a"), ("Organization", "own b")}
    assert relationship_props(graph_store, kb_id, "EMPLOYS") == []
    assert_invariants_hold(graph_store, kb_id)


def test_replace_that_keeps_both_entities_but_drops_their_relationship_removes_its_provenance(
    graph_store: GraphStore, kb_id: str
) -> None:
    """The re-extraction still names Acme and Ann but no longer says that one employs the other: the
    relationship loses this document's records (and goes when no other document states it)."""
    graph_store.write_document(acme_doc(kb_id, "a", "From A."), SCHEMA, "replace")
    graph_store.write_document(acme_doc(kb_id, "b", "From B."), SCHEMA, "replace")
    both_no_relationship = doc_graph(kb_id, "a", [
        ([("Acme Corp", "Organization", "From A."), ("Own a", "Organization")], []),
        ([("Acme Corp", "Organization", "From A."), ("Ann Lee", "Person")], []),
    ])

    summary = graph_store.write_document(both_no_relationship, SCHEMA, "replace")

    [employs] = relationship_props(graph_store, kb_id, "EMPLOYS")
    assert employs["chunk_ids"] == ["b:1"] and employs["description"] == "said by b"
    assert (summary.relationships, summary.relationships_deleted, summary.entities_deleted) == (0, 0, 0)
    graph_store.write_document(acme_doc(kb_id, "a", "From A."), SCHEMA, "replace")
    graph_store.remove_document(kb_id, "b")
    summary = graph_store.write_document(both_no_relationship, SCHEMA, "replace")
    assert relationship_props(graph_store, kb_id, "EMPLOYS") == []
    assert summary.relationships_deleted == 1
    assert set(entity_props(graph_store, kb_id)) == {
        ("Organization", "acme corp"), ("Organization", "own a"), ("Person", "ann lee"),
    }
    assert_invariants_hold(graph_store, kb_id)


def test_replace_removes_chunks_the_document_no_longer_has(graph_store: GraphStore, kb_id: str) -> None:
    three = doc_graph(kb_id, "d", [([("Acme", "Organization")], []), ([("Ann", "Person")], []),
                                   ([("Bo", "Person")], [])])
    graph_store.write_document(three, SCHEMA, "replace")
    summary = graph_store.write_document(
        doc_graph(kb_id, "d", [([("Acme", "Organization")], [])]), SCHEMA, "replace"
    )
    assert summary.chunks_removed == 2 and summary.entities_deleted == 2
    assert graph_store.document_counts(kb_id, "d").model_dump() == {
        "chunks": 1, "entities": 1, "relationships": 0, "mentions": 1,
    }
    assert graph_store.counts(kb_id).chunks == 1
    assert_invariants_hold(graph_store, kb_id)


def test_merge_adds_to_what_the_document_already_contributed(graph_store: GraphStore, kb_id: str) -> None:
    graph_store.write_document(acme_doc(kb_id, "a", "Makes rockets."), SCHEMA, "replace")
    second = doc_graph(kb_id, "a", [
        ([("Acme Corp", "Organization", "Based in Ohio.")], []),
        ([("Bo", "Person")], [("Acme Corp", "Organization", "EMPLOYS", "Bo", "Person")]),
    ], schema_version=2)

    summary = graph_store.write_document(second, SCHEMA, "merge")

    entities = entity_props(graph_store, kb_id)
    assert set(entities) == {("Organization", "acme corp"), ("Organization", "own a"), ("Person", "ann lee"),
                             ("Person", "bo")}
    assert entities[("Organization", "acme corp")]["description"] == "Based in Ohio.\nMakes rockets."
    assert len(relationship_props(graph_store, kb_id, "EMPLOYS")) == 2
    assert (summary.entities_deleted, summary.relationships_deleted, summary.mentions_removed) == (0, 0, 0)
    documents = [n["properties"] for n in graph_store.dump(kb_id).nodes if n["labels"] == ["Document"]]
    assert documents == [{"id": "a", "kb_id": kb_id, "schema_version": 2}]

    merged = graph_store.dump(kb_id)
    graph_store.write_document(second, SCHEMA, "merge")
    assert graph_store.dump(kb_id) == merged  # merging the same result again changes nothing
    assert_invariants_hold(graph_store, kb_id)


def test_replace_after_merge_leaves_exactly_the_new_graph(
    graph_store: GraphStore, new_kb_factory: Callable[[], str]
) -> None:
    merged_kb, fresh_kb = new_kb_factory(), new_kb_factory()
    graph_store.write_document(acme_doc(merged_kb, "a", "Old."), SCHEMA, "replace")
    graph_store.write_document(acme_doc(merged_kb, "a", "Older."), SCHEMA, "merge")
    graph_store.write_document(without_acme(merged_kb, "a"), SCHEMA, "replace")
    graph_store.write_document(without_acme(fresh_kb, "a"), SCHEMA, "replace")
    assert without_kb(graph_store.dump(merged_kb), merged_kb) == without_kb(graph_store.dump(fresh_kb), fresh_kb)


def test_random_replace_and_remove_sequences_equal_a_fresh_write_of_the_final_documents(
    graph_store: GraphStore, new_kb_factory: Callable[[], str]
) -> None:
    """Model check: whatever happened before, the graph is a function of the documents' final results."""
    rng = random.Random(1234)
    names = [f"Org {i}" for i in range(6)] + [f"Person {i}" for i in range(6)]

    def random_doc(kb: str, doc: str) -> DocumentGraph:
        chunks = []
        for _ in range(rng.randint(0, 3)):
            orgs = rng.sample(names[:6], 2)
            people = rng.sample(names[6:], 2)
            chunks.append((
                [(orgs[0], "Organization", rng.choice(["", "big", "small"])), (people[0], "Person")],
                [(orgs[1], "Organization", "EMPLOYS", people[1], "Person", rng.choice(["", "since 2020"]))],
            ))
        return doc_graph(kb, doc, chunks)

    history_kb, fresh_kb = new_kb_factory(), new_kb_factory()
    final: dict[str, DocumentGraph | None] = {}
    for _ in range(30):
        doc = rng.choice(["d1", "d2", "d3", "d4"])
        if rng.random() < 0.2:
            graph_store.remove_document(history_kb, doc)
            final[doc] = None
        else:
            graph = random_doc(history_kb, doc)
            graph_store.write_document(graph, SCHEMA, "replace")
            final[doc] = graph
    live = [g for g in final.values() if g is not None]
    rng.shuffle(live)
    for graph in live:
        graph_store.write_document(graph.model_copy(update={"kb_id": fresh_kb}), SCHEMA, "replace")

    assert without_kb(graph_store.dump(history_kb), history_kb) == without_kb(graph_store.dump(fresh_kb), fresh_kb)
    assert_invariants_hold(graph_store, history_kb)


# --- removal -----------------------------------------------------------------------------------


def test_remove_document_removes_exactly_what_only_it_contributed(graph_store: GraphStore, kb_id: str) -> None:
    graph_store.write_document(acme_doc(kb_id, "b", "From B."), SCHEMA, "replace")
    only_b = graph_store.dump(kb_id)
    graph_store.write_document(acme_doc(kb_id, "a", "From A."), SCHEMA, "replace")

    summary = graph_store.remove_document(kb_id, "a")

    assert graph_store.dump(kb_id) == only_b
    assert (summary.chunks_removed, summary.entities_deleted, summary.chunks) == (2, 1, 0)  # "own a" went
    assert graph_store.document_counts(kb_id, "a").model_dump() == {
        "chunks": 0, "entities": 0, "relationships": 0, "mentions": 0,
    }
    again = graph_store.remove_document(kb_id, "a")
    assert again.chunks_removed == 0 and graph_store.dump(kb_id) == only_b
    graph_store.remove_document(kb_id, "never-written")
    assert graph_store.dump(kb_id) == only_b


# --- counts and invariants ---------------------------------------------------------------------


def test_counts_describe_the_kb_and_each_document(graph_store: GraphStore, kb_id: str) -> None:
    empty = graph_store.counts(kb_id)
    assert empty.model_dump() == {"documents": 0, "chunks": 0, "entities": 0, "relationships": 0, "mentions": 0}
    summary = graph_store.write_document(acme_doc(kb_id, "a"), SCHEMA, "replace")
    graph_store.write_document(acme_doc(kb_id, "b"), SCHEMA, "replace")

    assert graph_store.counts(kb_id).model_dump() == {
        "documents": 2, "chunks": 4, "entities": 4, "relationships": 1, "mentions": 8,
    }
    assert graph_store.document_counts(kb_id, "a").model_dump() == {
        "chunks": 2, "entities": 3, "relationships": 1, "mentions": 4,
    }
    assert (summary.chunks, summary.entities, summary.relationships, summary.mentions) == (2, 3, 1, 4)
    assert (summary.entities_created, summary.relationships_created) == (3, 1)


def test_invariants_hold_on_a_healthy_graph(graph_store: GraphStore, kb_id: str) -> None:
    graph_store.write_document(acme_doc(kb_id, "a"), SCHEMA, "replace")
    reports = check_invariants(graph_store, kb_id)
    assert [r.name for r in reports] == [
        "duplicate_entities", "duplicate_relationships", "entities_without_provenance",
        "relationships_without_provenance", "edges_across_kbs",
    ]
    assert all(r.ok and r.examples == [] for r in reports)


# --- nothing crosses KBs -----------------------------------------------------------------------


def test_the_same_names_in_two_kbs_are_separate_graphs(
    graph_store: GraphStore, new_kb_factory: Callable[[], str]
) -> None:
    kb_a, kb_b = new_kb_factory(), new_kb_factory()
    graph_store.write_document(acme_doc(kb_a, "d", "In A."), SCHEMA, "replace")
    graph_store.write_document(acme_doc(kb_b, "d", "In B."), SCHEMA, "replace")
    b_before = graph_store.dump(kb_b)

    assert entity_props(graph_store, kb_a)[("Organization", "acme corp")]["description"] == "In A."
    for rel in graph_store.dump(kb_a).relationships:
        assert kb_b not in rel["start"] and kb_b not in rel["end"]
    graph_store.write_document(without_acme(kb_a, "d"), SCHEMA, "replace")
    graph_store.remove_document(kb_a, "d")

    assert graph_store.dump(kb_b) == b_before
    assert graph_store.counts(kb_a).model_dump() == {
        "documents": 0, "chunks": 0, "entities": 0, "relationships": 0, "mentions": 0,
    }
    for kb in (kb_a, kb_b):
        assert_invariants_hold(graph_store, kb)


def test_a_chunk_id_of_another_document_is_refused(graph_store: GraphStore, kb_id: str) -> None:
    graph_store.write_document(acme_doc(kb_id, "a"), SCHEMA, "replace")
    before = graph_store.dump(kb_id)
    thief = acme_doc(kb_id, "b").model_copy(update={"chunks": [GraphChunk(id="a:0", ordinal=0),
                                                               GraphChunk(id="b:1", ordinal=1)]})
    thief = thief.model_copy(update={"entities": [e.model_copy(update={"chunk_ids": ["a:0"]})
                                                  for e in thief.entities],
                                     "relationships": []})
    with pytest.raises(InvalidDocumentGraph, match="document b: chunk id.*'a:0' \\(document a\\)"):
        graph_store.write_document(thief, SCHEMA, "replace")
    assert graph_store.dump(kb_id) == before


# --- types and structure are checked before anything is written ---------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda g: g.entities.append(GraphEntity(type="Weapon", key="laser", name="Laser", description="",
                                                 chunk_ids=["d:0"])),
         "document d .*entity type 'Weapon' is not in the schema; allowed entity types: "
         "Organization, Person, Place"),
        (lambda g: g.relationships.append(GraphRelationship(type="OWNS", source=ACME, target=ANN, description="",
                                                            chunk_ids=["d:0"])),
         "document d .*relationship type 'OWNS' is not in the schema; allowed relationship types: "
         "EMPLOYS, LOCATED_IN"),
        (lambda g: g.relationships.append(GraphRelationship(type="EMPLOYS", source=ANN, target=ACME,
                                                            description="", chunk_ids=["d:0"])),
         "document d .*relationship type 'EMPLOYS' from 'Person' to 'Organization' is not allowed; "
         "EMPLOYS goes from \\[Organization\\] to \\[Person\\]"),
    ],
    ids=["entity-type", "relationship-type", "endpoint-types"],
)
def test_a_type_outside_the_schema_is_rejected_and_nothing_is_written(
    graph_store: GraphStore, kb_id: str, bad: Callable[[DocumentGraph], None], message: str
) -> None:
    graph_store.write_document(acme_doc(kb_id, "other"), SCHEMA, "replace")
    before = graph_store.dump(kb_id)
    graph = acme_doc(kb_id, "d")
    bad(graph)
    with pytest.raises(SchemaViolation, match=message):
        graph_store.write_document(graph, SCHEMA, "replace")
    assert graph_store.dump(kb_id) == before


def test_an_entity_type_dropped_from_a_newer_schema_is_rejected(graph_store: GraphStore, kb_id: str) -> None:
    newer = DomainSchema(entity_types=(EntityType(name="Organization"),))
    with pytest.raises(SchemaViolation, match="entity type 'Person' is not in the schema"):
        graph_store.write_document(acme_doc(kb_id, "d"), newer, "replace")
    assert graph_store.counts(kb_id).documents == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g: g.entities.__setitem__(0, g.entities[0].model_copy(update={"key": "Acme Corp"})),
         "not normalised"),
        (lambda g: g.entities.append(g.entities[0]), "listed twice"),
        (lambda g: g.entities.__setitem__(0, g.entities[0].model_copy(update={"chunk_ids": ["elsewhere"]})),
         "'elsewhere' that are not among the document's chunks"),
        (lambda g: g.entities.__setitem__(0, g.entities[0].model_copy(update={"chunk_ids": []})),
         "lists no chunk"),
        (lambda g: g.relationships.append(GraphRelationship(
            type="EMPLOYS", source=ACME, target=EntityRef(type="Person", key="ghost"), description="",
            chunk_ids=["d:0"])), "endpoint that is not among the document's entities"),
    ],
    ids=["unnormalised-key", "repeated-entity", "foreign-chunk", "no-provenance", "missing-endpoint"],
)
def test_a_malformed_document_graph_is_rejected_and_nothing_is_written(
    graph_store: GraphStore, kb_id: str, change: Callable[[DocumentGraph], None], message: str
) -> None:
    graph = acme_doc(kb_id, "d")
    change(graph)
    with pytest.raises(InvalidDocumentGraph, match=message):
        graph_store.write_document(graph, SCHEMA, "replace")
    assert graph_store.counts(kb_id).documents == 0
