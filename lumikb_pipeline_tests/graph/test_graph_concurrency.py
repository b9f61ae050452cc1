"""Many writer processes at once: no duplicates, no lost provenance, no write lost to a deadlock."""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.store import GraphStore, check_invariants
from lumikb_pipeline_tests.conftest import required_env
from lumikb_pipeline_tests.graph.concurrent_writers import Operation, run_writer
from lumikb_pipeline_tests.graph.factories import SCHEMA, doc_graph, without_kb

WRITERS = 8
DOCUMENTS_PER_WRITER = 50
POOL = [(f"Organization {i}", "Organization") for i in range(100)] + [(f"Person {i}", "Person") for i in range(100)]


def random_document(rng: random.Random, kb_id: str, doc_id: str) -> DocumentGraph:
    """Three chunks, each naming 4 organizations and 4 people of the shared pool of 200 names and
    6 EMPLOYS between them, with descriptions from a small set (so they merge across documents)."""
    chunks = []
    for _ in range(3):
        orgs = rng.sample(POOL[:100], 4)
        people = rng.sample(POOL[100:], 4)
        entities = [(name, kind, rng.choice(["", "big", "small", "old"])) for name, kind in orgs + people]
        rels = [
            (rng.choice(orgs)[0], "Organization", "EMPLOYS", rng.choice(people)[0], "Person",
             rng.choice(["", "since 2020"]))
            for _ in range(6)
        ]
        chunks.append((entities, rels))
    return doc_graph(kb_id, doc_id, chunks)


def plan_writers(kb_id: str) -> tuple[list[list[Operation]], dict[str, DocumentGraph]]:
    """Each writer writes its 50 documents, then re-extracts 10 of them (replace) and removes 5.

    Returns the operations per writer and the documents' final contributions.
    """
    rng = random.Random(42)
    per_writer: list[list[Operation]] = []
    final: dict[str, DocumentGraph] = {}
    for w in range(WRITERS):
        doc_ids = [f"w{w}-d{d}" for d in range(DOCUMENTS_PER_WRITER)]
        operations: list[Operation] = []
        for doc_id in doc_ids:
            final[doc_id] = random_document(rng, kb_id, doc_id)
            operations.append(final[doc_id])
        for doc_id in rng.sample(doc_ids, 10):
            final[doc_id] = random_document(rng, kb_id, doc_id)
            operations.append(final[doc_id])
        for doc_id in rng.sample(doc_ids, 5):
            del final[doc_id]
            operations.append((kb_id, doc_id))
        per_writer.append(operations)
    return per_writer, final


def run_concurrently(target: tuple[str, ...], per_writer: list[list[Operation]]) -> int:
    """Run one process per writer, all starting together; return the driver's retries in total."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(WRITERS)
        with ProcessPoolExecutor(max_workers=WRITERS, mp_context=context) as pool:
            futures = [pool.submit(run_writer, target, operations, barrier) for operations in per_writer]
            results = [future.result(timeout=900) for future in futures]
    # The writers really ran at the same time: each started before any other had finished.
    assert max(started for _, started, _ in results) < min(finished for _, _, finished in results)
    return sum(retries for retries, _, _ in results)


def assert_graph_is_exactly_the_final_documents(
    store: GraphStore, kb_id: str, final: dict[str, DocumentGraph], reference_path: Path
) -> None:
    for report in check_invariants(store, kb_id):
        assert report.count == 0, report
    entities = {(e.type, e.key) for g in final.values() for e in g.entities}
    relationships = {(r.type, r.source, r.target) for g in final.values() for r in g.relationships}
    mentions = sum(len(e.chunk_ids) for g in final.values() for e in g.entities)
    counts = store.counts(kb_id)
    assert counts.model_dump() == {
        "documents": len(final), "chunks": 3 * len(final), "entities": len(entities),
        "relationships": len(relationships), "mentions": mentions,
    }
    # The whole graph, property by property, equals the same final documents written one by one.
    reference = EmbeddedGraphStore(reference_path)
    for graph in final.values():
        reference.write_document(graph, SCHEMA, "replace")
    assert without_kb(store.dump(kb_id), kb_id) == without_kb(reference.dump(kb_id), kb_id)


@pytest.mark.slow
def test_eight_writer_processes_on_neo4j_lose_nothing(new_kb_factory: Callable[[], str], tmp_path: Path) -> None:
    kb_id = new_kb_factory()
    target = (
        "neo4j", required_env("LUMIKB_NEO4J_URI"), required_env("LUMIKB_NEO4J_USER"),
        required_env("LUMIKB_NEO4J_PASSWORD"), os.environ.get("LUMIKB_NEO4J_DATABASE") or "neo4j",
    )
    per_writer, final = plan_writers(kb_id)

    retries = run_concurrently(target, per_writer)

    from lumikb_pipeline_tests.graph.conftest import neo4j_store

    assert_graph_is_exactly_the_final_documents(neo4j_store(), kb_id, final, tmp_path / "reference.sqlite3")
    print(f"neo4j: {retries} transaction(s) retried by the driver (deadlocks, transient errors)")


@pytest.mark.slow
def test_eight_writer_processes_on_the_embedded_store_lose_nothing(tmp_path: Path) -> None:
    kb_id = "concurrency"
    path = tmp_path / "graph.sqlite3"
    per_writer, final = plan_writers(kb_id)

    run_concurrently(("embedded", str(path)), per_writer)

    assert_graph_is_exactly_the_final_documents(
        EmbeddedGraphStore(path), kb_id, final, tmp_path / "reference.sqlite3"
    )
