"""Writes are ordered by schema version (issue 12): a late write of an older extraction never
replaces a newer one, in both stores."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.graph.store import GraphStore, check_invariants
from lumikb_pipeline_tests.graph.factories import SCHEMA, doc_graph, without_kb


def extraction(kb_id: str, doc_id: str, version: int) -> DocumentGraph:
    """What extracting `doc_id` at `version` gave: each version finds different entities, so the
    graph shows which one was written."""
    return doc_graph(kb_id, doc_id, [
        ([("Acme Corp", "Organization", f"seen at v{version}"), (f"Only v{version} {doc_id}", "Person")],
         [("Acme Corp", "Organization", "EMPLOYS", f"Only v{version} {doc_id}", "Person", f"v{version}")]),
    ], schema_version=version)


def document_versions(store: GraphStore, kb_id: str) -> dict[str, int]:
    return {
        n["properties"]["id"]: n["properties"]["schema_version"]
        for n in store.dump(kb_id).nodes if n["labels"] == ["Document"]
    }


@pytest.mark.parametrize("mode", ["replace", "merge"])
def test_an_older_versions_write_finishing_after_a_newer_one_is_refused_and_changes_nothing(
    graph_store: GraphStore, kb_id: str, mode: WriteMode
) -> None:
    graph_store.write_document(extraction(kb_id, "a", 2), SCHEMA, mode)
    newer = graph_store.dump(kb_id)

    late = graph_store.write_document(extraction(kb_id, "a", 1), SCHEMA, mode)

    assert late.refused and late.newer_version_held == 2
    assert (late.entities_created, late.relationships_created, late.chunks_removed) == (0, 0, 0)
    assert graph_store.dump(kb_id) == newer
    assert document_versions(graph_store, kb_id) == {"a": 2}


def test_writes_at_the_same_or_a_newer_version_proceed(graph_store: GraphStore, kb_id: str) -> None:
    first = graph_store.write_document(extraction(kb_id, "a", 1), SCHEMA, "replace")
    again = graph_store.write_document(extraction(kb_id, "a", 1), SCHEMA, "replace")
    newer = graph_store.write_document(extraction(kb_id, "a", 3), SCHEMA, "replace")

    assert not (first.refused or again.refused or newer.refused)
    assert document_versions(graph_store, kb_id) == {"a": 3}
    people = {n["properties"]["name"] for n in graph_store.dump(kb_id).nodes
              if n["labels"] == ["Entity"] and n["properties"]["type"] == "Person"}
    assert people == {"Only v3 a"}


def test_racing_writes_of_two_versions_always_leave_the_newer_one(
    graph_store: GraphStore, new_kb_factory: Callable[[], str]
) -> None:
    """Normal processing at v1 and the schema sensor's job at v2 write the same documents at the same
    moment, in random order: every document ends at v2, with exactly v2's contribution."""
    raced, expected = new_kb_factory(), new_kb_factory()
    doc_ids = [f"d{i}" for i in range(12)]
    rng = random.Random(12)
    refused: list[str] = []
    errors: list[BaseException] = []

    def write(graph: DocumentGraph, start: threading.Barrier) -> None:
        try:
            start.wait()
            if graph_store.write_document(graph, SCHEMA, "replace").refused:
                refused.append(graph.doc_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    for doc_id in doc_ids:
        if rng.random() < 0.5:  # v2 lands first half the time: then v1 is the late write
            graph_store.write_document(extraction(raced, doc_id, 2), SCHEMA, "replace")
        start = threading.Barrier(2)
        threads = [threading.Thread(target=write, args=(extraction(raced, doc_id, v), start)) for v in (1, 2)]
        rng.shuffle(threads)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        graph_store.write_document(extraction(expected, doc_id, 2), SCHEMA, "replace")

    assert errors == []
    assert document_versions(graph_store, raced) == dict.fromkeys(doc_ids, 2)
    assert without_kb(graph_store.dump(raced), raced) == without_kb(graph_store.dump(expected), expected)
    assert refused, "no v1 write came after a v2 write: the race was not exercised"
    for report in check_invariants(graph_store, raced):
        assert report.ok, report
