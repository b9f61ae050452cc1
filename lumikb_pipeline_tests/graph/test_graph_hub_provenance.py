"""Hub entities cost O(1) per document: provenance records, bounded aggregates, and the migration of
graphs written before them (PRODUCT.md section 2, docs/graph-model.md "Provenance")."""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph
from lumikb_pipeline.graph import embedded_store
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.merging import choose_name, text_order
from lumikb_pipeline.graph.plan import RelKey, Tally
from lumikb_pipeline.graph.store import GraphStore, InvariantReport, check_invariants
from lumikb_pipeline_tests.graph.factories import SCHEMA, doc_graph

TEXTS = ["a", "bb", "ccc", "dddd", "e", "ff", "ggggg", "z", "𝔘", "\ue000", "Ab", "ab"]


def expected_join(counter: Counter[str], cap: int) -> str:
    return "\n".join(sorted((t for t, n in counter.items() if n > 0), key=text_order))[:cap]


@pytest.mark.parametrize("cap", [1, 4, 9, 20, None])
def test_a_tally_updated_record_by_record_equals_a_recount(cap: int | None) -> None:
    """Random additions and removals applied to the bounded tally give the merged text and the
    chosen name that a recount of every record gives, with or without a cap (recounting only when
    the tally asks for it)."""
    rng = random.Random(cap or 0)
    records: Counter[str] = Counter()
    tally = Tally()
    recounts = 0
    for _ in range(3000):
        delta: Counter[str] = Counter()
        for text in rng.sample(TEXTS, rng.randint(1, 3)):
            change = rng.choice([1, 1, 2, -1]) if records[text] + delta[text] > 0 else 1
            delta[text] += change
        records.update(delta)
        updated = tally.updated(delta, cap)
        if updated is None:
            recounts += 1
            updated = Tally.of(records, cap)
        tally = updated
        if cap is None:
            assert tally.top() == choose_name(+records)
            assert dict(zip(tally.texts, tally.counts, strict=True)) == +records
        else:
            assert "\n".join(tally.texts)[:cap] == expected_join(records, cap)
    assert recounts < 3000 // 10  # a recount is the exception


def hub_document(kb_id: str, d: int, version: int = 1) -> DocumentGraph:
    """Document d: names the hub pair (Acme employs Jane) with descriptions of its own."""
    return doc_graph(kb_id, f"doc-{d:04d}", [(
        [("Acme", "Organization", f"Acme in document {d}, v{version}."), ("Jane", "Person", "An engineer.")],
        [("Acme", "Organization", "EMPLOYS", "Jane", "Person", f"Since {d} (v{version}).")],
    )])


def test_a_hub_write_reads_only_its_own_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """400 documents name the same pair with distinct descriptions: no write of a new document reads
    another document's records, and re-extracting or removing documents rarely does (only to refill
    the kept head of descriptions); the result is exact."""
    loads: list[str] = []

    class CountingRecords(embedded_store._Records):
        def entity_records(self, ref: tuple[str, str]) -> list[tuple[str, tuple[frozenset[str], frozenset[str]]]]:
            loads.append("entity")
            return super().entity_records(ref)

        def relationship_records(self, key: RelKey) -> list[tuple[str, str]]:
            loads.append("relationship")
            return super().relationship_records(key)

    monkeypatch.setattr(embedded_store, "_Records", CountingRecords)
    store = EmbeddedGraphStore(tmp_path / "hub.sqlite3")
    for d in range(400):
        store.write_document(hub_document("kb", d), SCHEMA, WriteMode.REPLACE)
    assert loads == []
    for d in range(0, 400, 4):
        store.write_document(hub_document("kb", d, version=2), SCHEMA, WriteMode.REPLACE)
    for d in range(0, 400, 8):
        store.remove_document("kb", f"doc-{d:04d}")
    assert len(loads) <= 10, loads

    fresh = EmbeddedGraphStore(tmp_path / "fresh.sqlite3")
    for d in range(400):
        if d % 8:
            fresh.write_document(hub_document("kb", d, version=2 if d % 4 == 0 else 1), SCHEMA, WriteMode.REPLACE)
    assert store.dump("kb") == fresh.dump("kb")
    rel = next(r for r in store.dump("kb").relationships if r["type"] == "EMPLOYS")
    assert len(rel["properties"]["source_chunk_ids"]) == 350


# --- migration of graphs written before provenance records -------------------------------------------


def history(kb_id: str) -> list[tuple[str, DocumentGraph | str]]:
    """Writes, merges and a removal over shared entities, as the old stores wrote them."""
    steps: list[tuple[str, DocumentGraph | str]] = [
        ("replace", hub_document(kb_id, d)) for d in range(6)
    ]
    steps.append(("merge", doc_graph(kb_id, "doc-0001", [(
        [("ACME", "Organization", "Merged.")], [("ACME", "Organization", "EMPLOYS", "Ann", "Person", "")])])))
    steps.append(("remove", "doc-0002"))
    return steps


def apply(store: object, steps: list[tuple[str, DocumentGraph | str]], kb_id: str) -> None:
    for mode, item in steps:
        if mode == "remove":
            store.remove_document(kb_id, item)  # type: ignore[attr-defined]
        else:
            store.write_document(item, SCHEMA, mode)  # type: ignore[attr-defined]


def continue_after_migration(store: GraphStore, kb_id: str) -> None:
    """Re-extract, remove and add on the converted graph: the provenance must still be exact."""
    store.write_document(hub_document(kb_id, 3, version=2), SCHEMA, WriteMode.REPLACE)
    store.remove_document(kb_id, "doc-0001")
    store.write_document(hub_document(kb_id, 9), SCHEMA, WriteMode.REPLACE)


def test_an_embedded_graph_of_the_old_model_is_converted_on_open(tmp_path: Path) -> None:
    from lumikb_pipeline_tests.graph.legacy.embedded_store import EmbeddedGraphStore as OldEmbeddedStore

    path = tmp_path / "graph.sqlite3"
    old = OldEmbeddedStore(path)
    apply(old, history("kb"), "kb")
    old_dump = old.dump("kb")

    migrated = EmbeddedGraphStore(path)  # ensure_schema converts the file
    assert migrated.dump("kb") == old_dump
    fresh = EmbeddedGraphStore(tmp_path / "fresh.sqlite3")
    apply(fresh, history("kb"), "kb")
    assert migrated.dump("kb") == fresh.dump("kb")
    assert embedded_store.EmbeddedGraphStore(path).dump("kb") == old_dump  # converting again changes nothing

    continue_after_migration(migrated, "kb")
    continue_after_migration(fresh, "kb")
    assert migrated.dump("kb") == fresh.dump("kb")
    assert all(report.count == 0 for report in _invariants(migrated, "kb"))


@pytest.mark.slow  # a whole graph converted in Neo4j: out of the fast step
def test_a_neo4j_graph_of_the_old_model_is_converted(tmp_path: Path, new_kb_factory: Callable[[], str]) -> None:
    from lumikb_pipeline_tests.graph.conftest import neo4j_store
    from lumikb_pipeline_tests.graph.legacy.neo4j_store import Neo4jGraphStore as OldNeo4jStore

    store = neo4j_store()
    kb_id = new_kb_factory()
    old = OldNeo4jStore(
        os.environ["LUMIKB_NEO4J_URI"], os.environ["LUMIKB_NEO4J_USER"], os.environ["LUMIKB_NEO4J_PASSWORD"],
        database=store.database,
    )
    apply(old, history(kb_id), kb_id)
    old_dump = old.dump(kb_id)
    assert any("source_chunk_ids" in r["properties"] for r in old_dump.relationships)  # the old model

    assert store.migrate_provenance(force=True) >= 1
    assert store.dump(kb_id) == old_dump
    assert store.migrate_provenance(force=True) == 0  # idempotent: nothing left to convert
    fresh = EmbeddedGraphStore(tmp_path / "fresh.sqlite3")
    apply(fresh, history(kb_id), kb_id)
    assert store.dump(kb_id) == fresh.dump(kb_id)

    continue_after_migration(store, kb_id)
    continue_after_migration(fresh, kb_id)
    assert store.dump(kb_id) == fresh.dump(kb_id)
    assert all(report.count == 0 for report in _invariants(store, kb_id))


def _invariants(store: GraphStore, kb_id: str) -> list[InvariantReport]:
    return check_invariants(store, kb_id)


# --- Neo4j: a hub document's write reads the same whatever the hub's degree ----------------------


def neo4j_hub_document(kb_id: str, d: int, version: int = 1) -> DocumentGraph:
    """Document d: names the hub pairs Acme -EMPLOYS-> Jane and Jane -LOCATED_IN-> Oslo, and a
    person of its own whom Acme employs and who lives in Oslo (so the hubs gain relationships)."""
    own = f"Person {d}"
    return doc_graph(kb_id, f"doc-{d:04d}", [(
        [("Acme", "Organization", "A company."), ("Jane", "Person", "An engineer."), ("Oslo", "Place"),
         (own, "Person", f"Named in document {d}, v{version}.")],
        [("Acme", "Organization", "EMPLOYS", "Jane", "Person", f"Since {d} (v{version})."),
         ("Jane", "Person", "LOCATED_IN", "Oslo", "Place"),
         ("Acme", "Organization", "EMPLOYS", own, "Person"),
         (own, "Person", "LOCATED_IN", "Oslo", "Place")],
    )])


class _ProfiledTransaction:
    """Runs each query of a write with PROFILE and adds up its database hits."""

    def __init__(self, tx: object) -> None:
        self.tx, self.hits = tx, 0

    def run(self, query: str, parameters: dict[str, object] | None = None, **kwargs: object) -> object:
        result = self.tx.run("PROFILE " + query, parameters, **kwargs)  # type: ignore[attr-defined]
        records = list(result)
        stack = [result.consume().profile]
        while stack:
            operator = stack.pop()
            self.hits += operator.get("dbHits", 0)
            stack += operator.get("children", [])
        return _Records(records)


class _Records:
    def __init__(self, records: list[object]) -> None:
        self.records = records

    def single(self) -> object:
        return self.records[0] if self.records else None

    def consume(self) -> None:
        return None

    def __iter__(self) -> object:
        return iter(self.records)


@pytest.mark.slow  # builds a hub in Neo4j: out of the fast step
def test_a_neo4j_hub_write_reads_the_same_at_any_degree(new_kb_factory: Callable[[], str]) -> None:
    """Writing a new document that names the hubs, and re-extracting one, costs the same database
    hits with 60 and with 240 documents naming them: no lookup expands a hub's relationships
    (a relationship is found between its two bound endpoints, starting from the one with fewer
    relationships of its type)."""
    from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore
    from lumikb_pipeline_tests.graph.conftest import neo4j_store

    store = neo4j_store()
    kb_id = new_kb_factory()

    def hits(graph: DocumentGraph) -> int:
        with store._driver.session(database=store.database) as session:
            tx = session.begin_transaction()
            try:
                profiled = _ProfiledTransaction(tx)
                Neo4jGraphStore._write(profiled, kb_id, graph.doc_id, graph, WriteMode.REPLACE)  # type: ignore[arg-type]
                return profiled.hits
            finally:
                tx.rollback()

    at: dict[int, tuple[int, int]] = {}
    written = 0
    for degree in (60, 240):
        for d in range(written, degree):
            store.write_document(neo4j_hub_document(kb_id, d), SCHEMA, WriteMode.REPLACE)
        written = degree
        at[degree] = (hits(neo4j_hub_document(kb_id, 10_000)), hits(neo4j_hub_document(kb_id, 7, version=2)))
    (new_low, again_low), (new_high, again_high) = at[60], at[240]
    assert new_high <= new_low + 5, at
    assert again_high <= again_low + 5, at
