"""The invariant queries find real violations (a graph corrupted behind the store's back)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore
from lumikb_pipeline.graph.store import GraphStore, check_invariants
from lumikb_pipeline_tests.graph.factories import SCHEMA, doc_graph


def write_healthy(store: GraphStore, kb_id: str) -> None:
    store.write_document(doc_graph(kb_id, "d", [(
        [("Acme", "Organization"), ("Ann", "Person")],
        [("Acme", "Organization", "EMPLOYS", "Ann", "Person")],
    )]), SCHEMA, "replace")


def reports(store: GraphStore, kb_id: str) -> dict[str, tuple[int, list[str]]]:
    return {r.name: (r.count, r.examples) for r in check_invariants(store, kb_id)}


def test_neo4j_invariant_queries_report_each_kind_of_corruption(new_kb_factory: Callable[[], str]) -> None:
    from lumikb_pipeline_tests.graph.conftest import neo4j_store

    store = neo4j_store()
    kb_id, other_kb = new_kb_factory(), new_kb_factory()
    write_healthy(store, kb_id)
    write_healthy(store, other_kb)

    def cypher(query: str) -> None:
        store._driver.execute_query(query, kb_id=kb_id, other=other_kb, database_=store.database)

    # An orphan entity, a second EMPLOYS between the same pair, a relationship with no chunk and one
    # naming a chunk that does not exist, and a MENTIONS edge from this KB's chunk into another KB.
    cypher("CREATE (:Entity {kb_id: $kb_id, type: 'Person', key: 'ghost', name: 'Ghost', description: ''})")
    cypher("MATCH (a:Entity {kb_id: $kb_id, key: 'acme'}), (b:Entity {kb_id: $kb_id, key: 'ann'}) "
           "CREATE (a)-[:EMPLOYS {type: 'EMPLOYS', kb_id: $kb_id, chunk_ids: []}]->(b)")
    cypher("MATCH (a:Entity {kb_id: $kb_id, key: 'ann'}), (b:Entity {kb_id: $kb_id, key: 'acme'}) "
           "CREATE (a)-[:LOCATED_IN {type: 'LOCATED_IN', kb_id: $kb_id, chunk_ids: ['gone']}]->(b)")
    cypher("MATCH (c:Chunk {kb_id: $kb_id}), (e:Entity {kb_id: $other, key: 'acme'}) CREATE (c)-[:MENTIONS]->(e)")

    found = reports(store, kb_id)
    assert found["duplicate_entities"] == (0, [])  # the uniqueness constraint forbids them outright
    assert found["duplicate_relationships"] == (1, ["Organization:acme -[EMPLOYS]-> Person:ann x2"])
    assert found["entities_without_provenance"] == (1, ["Person:ghost"])
    count, examples = found["relationships_without_provenance"]
    assert count == 2 and "Person:ann -[LOCATED_IN]-> Organization:acme" in examples
    count, examples = found["edges_across_kbs"]
    assert count == 1 and examples[0].startswith("MENTIONS d:0 -> " + other_kb)
    assert reports(store, other_kb)["edges_across_kbs"][0] == 1  # seen from the other side too


def test_embedded_invariant_queries_report_each_kind_of_corruption(tmp_path: Path) -> None:
    path = tmp_path / "graph.sqlite3"
    store = EmbeddedGraphStore(path)
    write_healthy(store, "kb")
    conn = sqlite3.connect(path, isolation_level=None)  # foreign keys off: the corruption gets in
    conn.execute("INSERT INTO entities VALUES ('kb', 'Person', 'ghost', 'Ghost', '', '')")
    conn.execute("UPDATE relationship_sources SET chunk_id = 'gone' WHERE kb_id = 'kb'")
    conn.execute("INSERT INTO mentions VALUES ('kb', 'no-such-chunk', 'Person', 'ann', '[]', '[]')")
    conn.close()

    found = reports(store, "kb")
    assert found["duplicate_entities"] == (0, []) and found["duplicate_relationships"] == (0, [])
    assert found["entities_without_provenance"] == (1, ["Person:ghost"])
    assert found["relationships_without_provenance"] == (1, ["Organization:acme -[EMPLOYS]-> Person:ann"])
    assert found["edges_across_kbs"] == (1, ["MENTIONS no-such-chunk -> Person:ann"])


def test_neo4j_and_the_embedded_store_build_identical_graphs(tmp_path: Path, kb_id: str) -> None:
    """One contract, two stores: the same writes give the same dump, property by property."""
    from lumikb_pipeline_tests.graph.conftest import neo4j_store

    neo4j: Neo4jGraphStore = neo4j_store()
    embedded = EmbeddedGraphStore(tmp_path / "graph.sqlite3")
    for store in (neo4j, embedded):
        write_healthy(store, kb_id)
        store.write_document(doc_graph(kb_id, "e", [([("ACME", "Organization", "Big.")], [])]), SCHEMA, "merge")
        store.write_document(doc_graph(kb_id, "f", [([("Ann", "Person", "Engineer.")], [])]), SCHEMA, "replace")
        store.write_document(doc_graph(kb_id, "e", [([("Acme", "Organization", "Small.")], [])]), SCHEMA, "merge")
        store.remove_document(kb_id, "f")
    assert neo4j.dump(kb_id) == embedded.dump(kb_id)
