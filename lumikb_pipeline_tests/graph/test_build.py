"""`build_document_graph`: chunk extractions aggregated into one document's contribution."""

from __future__ import annotations

import random

import pytest

from lumikb_pipeline.domain.results import ChunkExtraction, EntityRef, GraphChunk
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.merging import MAX_MERGED_DESCRIPTION, choose_name, merge_descriptions
from lumikb_pipeline.graph.store import InvalidDocumentGraph
from lumikb_pipeline_tests.graph.factories import doc_graph, entity, relationship

ACME = EntityRef(type="Organization", key="acme corp")


def test_one_entity_named_in_several_chunks_is_one_entity_with_all_its_chunks() -> None:
    graph = doc_graph("kb", "d", [
        ([("Acme Corp", "Organization", "Makes rockets.")], []),
        ([("ACME Corp.", "Organization", "Based in Ohio.")], []),
        ([("Acme Corp", "Organization", "Makes rockets.")], []),
    ])
    assert len(graph.entities) == 1
    acme = graph.entities[0]
    assert (acme.type, acme.key) == ("Organization", "acme corp")
    assert acme.chunk_ids == ["d:0", "d:1", "d:2"]
    assert acme.name == "Acme Corp"  # given in two chunks out of three
    assert acme.description == "Based in Ohio.\nMakes rockets."  # sorted, unique


def test_same_name_with_different_types_is_two_entities() -> None:
    graph = doc_graph("kb", "d", [([("Jordan", "Person"), ("Jordan", "Place")], [])])
    assert {(e.type, e.key) for e in graph.entities} == {("Person", "jordan"), ("Place", "jordan")}


def test_name_ties_are_broken_by_text_not_by_order() -> None:
    one = doc_graph("kb", "d", [([("ACME corp", "Organization")], []), ([("Acme Corp", "Organization")], [])])
    two = doc_graph("kb", "d", [([("Acme Corp", "Organization")], []), ([("ACME corp", "Organization")], [])])
    assert one.entities[0].name == two.entities[0].name == "ACME corp"


def test_names_with_an_empty_key_are_not_entities() -> None:
    graph = doc_graph("kb", "d", [(
        [("...", "Organization"), ("Acme", "Organization")],
        [("—", "Organization", "EMPLOYS", "Ann", "Person")],
    )])
    assert [e.key for e in graph.entities] == ["acme"]
    assert graph.relationships == []  # its source has an empty key: dropped


def test_relationship_endpoints_not_extracted_in_the_chunk_are_added_as_entities() -> None:
    graph = doc_graph("kb", "d", [
        ([("Acme Corp", "Organization", "A company.")], []),
        ([], [("Acme Corp", "Organization", "EMPLOYS", "Ann Lee", "Person", "Since 2020.")]),
    ])
    by_ref = {EntityRef(type=e.type, key=e.key): e for e in graph.entities}
    assert by_ref[ACME].chunk_ids == ["d:0", "d:1"]  # chunk 1 names it in the relationship
    ann = by_ref[EntityRef(type="Person", key="ann lee")]
    assert (ann.name, ann.description, ann.chunk_ids) == ("Ann Lee", "", ["d:1"])
    [rel] = graph.relationships
    assert (rel.type, rel.source, rel.target) == ("EMPLOYS", ACME, EntityRef(type="Person", key="ann lee"))
    assert (rel.description, rel.chunk_ids) == ("Since 2020.", ["d:1"])


def test_one_relationship_from_several_chunks_lists_each_chunk_once() -> None:
    rel = ("Acme", "Organization", "EMPLOYS", "Ann", "Person")
    graph = doc_graph("kb", "d", [([], [(*rel, "b")]), ([], [(*rel, "a"), (*rel, "a")]), ([], [])])
    [merged] = graph.relationships
    assert merged.chunk_ids == ["d:0", "d:1"]
    assert merged.description == "a\nb"
    assert [c.id for c in graph.chunks] == ["d:0", "d:1", "d:2"]  # empty chunks stay listed


def test_the_result_does_not_depend_on_the_order_of_extractions() -> None:
    rng = random.Random(7)
    names = ["Acme", "ACME", "Globex", "Initech", "acme."]
    chunks = [GraphChunk(id=f"c{i}", ordinal=i) for i in range(6)]
    extractions = [
        ChunkExtraction(
            chunk_id=c.id,
            entities=[entity((rng.choice(names), "Organization", rng.choice(["", "x", "y"]))) for _ in range(3)],
            relationships=[relationship((rng.choice(names), "Organization", "EMPLOYS", "Ann", "Person"))],
        )
        for c in chunks
    ]
    expected = build_document_graph("kb", "d", 1, chunks, extractions)
    for _ in range(5):
        shuffled = extractions[:]
        rng.shuffle(shuffled)
        reordered_chunks = chunks[:]
        rng.shuffle(reordered_chunks)
        assert build_document_graph("kb", "d", 1, reordered_chunks, shuffled) == expected


def test_an_extraction_of_an_unknown_chunk_is_refused() -> None:
    with pytest.raises(InvalidDocumentGraph, match="document d: .*chunk 'other'"):
        build_document_graph("kb", "d", 1, [GraphChunk(id="c0", ordinal=0)], [ChunkExtraction(chunk_id="other")])


def test_repeated_chunk_ids_are_refused() -> None:
    chunks = [GraphChunk(id="c0", ordinal=0), GraphChunk(id="c0", ordinal=1)]
    with pytest.raises(InvalidDocumentGraph, match="repeated: c0"):
        build_document_graph("kb", "d", 1, chunks, [])


def test_merged_descriptions_are_sorted_unique_and_bounded() -> None:
    assert merge_descriptions(["b", "a", "b", "", "  "]) == "a\nb"
    assert merge_descriptions([]) == ""
    long = merge_descriptions(["x" * MAX_MERGED_DESCRIPTION, "y"])
    assert len(long) == MAX_MERGED_DESCRIPTION
    assert merge_descriptions(["z" * 10_000]) == "z" * 10_000  # one long description stays whole


def test_choose_name_prefers_the_most_frequent_then_the_smallest_text() -> None:
    from collections import Counter

    assert choose_name(Counter({"Acme": 1, "ACME": 3})) == "ACME"
    assert choose_name(Counter({"acme": 2, "Acme": 2})) == "Acme"
    assert choose_name(Counter()) == ""
