"""The Neo4j store merges provenance in Cypher, the embedded store in Python (`graph.plan`): the same
history of writes must give the same graph and the same write summaries in both.

The texts are chosen where the two languages could disagree: names whose order differs between
Unicode code points and UTF-16 code units (Neo4j sorts by the latter), blank and long descriptions
(merged descriptions are cut at `MAX_MERGED_DESCRIPTION`), names that differ only in presentation
and so share a key.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lumikb_pipeline.domain.keys import normalise_key
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import DocumentGraph, EntityRef, GraphChunk, GraphEntity, GraphRelationship
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.merging import MAX_MERGED_DESCRIPTION
from lumikb_pipeline.graph.store import GraphStore, check_invariants
from lumikb_pipeline_tests.graph.factories import SCHEMA

# Entities by type, each a list of names sharing one key. "Acme 𝔸" (U+1D538) and "Acme Ａ" (U+FF21)
# both normalise to "acme a" and sort in opposite orders by code point and by UTF-16 code unit.
NAMES = {
    "Organization": [
        ["Acme 𝔸", "Acme Ａ", "ACME A", "acme a"],
        ["Globex", "GLOBEX", "Globex!"],
        ["Initech 😀", "INITECH 😀"],
    ],
    "Person": [["Ann Lee", "ANN LEE", "Ann  Lee"], ["Bob \ue000", "bob \ue000"]],
    "Place": [["Oslo", "OSLO"]],
}
DESCRIPTIONS = [
    "", " ", "\n", "Big.", "big.", "😀 emoji first", "\ue000 private use first", "\uffff last BMP",
    "x" * 9_000, "y" * 9_000,  # two of them exceed the merged bound
]
RELATIONSHIP_TYPES = [("EMPLOYS", "Organization", "Person"), ("LOCATED_IN", "Organization", "Place"),
                      ("LOCATED_IN", "Person", "Place")]


def random_graph(rng: random.Random, kb_id: str, doc_id: str) -> DocumentGraph:
    chunk_ids = [f"{doc_id}:{i}" for i in range(rng.randint(1, 3))]
    entities: dict[tuple[str, str], GraphEntity] = {}
    for _ in range(rng.randint(1, 5)):
        entity_type = rng.choice(list(NAMES))
        name = rng.choice(rng.choice(NAMES[entity_type]))
        key = normalise_key(name)
        entities[(entity_type, key)] = GraphEntity(
            type=entity_type, key=key, name=name, description=rng.choice(DESCRIPTIONS),
            chunk_ids=rng.sample(chunk_ids, rng.randint(1, len(chunk_ids))),
        )
    relationships: dict[tuple[str, str, str, str, str], GraphRelationship] = {}
    for rel_type, source_type, target_type in RELATIONSHIP_TYPES:
        sources = [e for e in entities.values() if e.type == source_type]
        targets = [e for e in entities.values() if e.type == target_type]
        for source in sources:
            for target in targets:
                if rng.random() < 0.7:
                    relationships[(rel_type, source.type, source.key, target.type, target.key)] = GraphRelationship(
                        type=rel_type,
                        source=EntityRef(type=source.type, key=source.key),
                        target=EntityRef(type=target.type, key=target.key),
                        description=rng.choice(DESCRIPTIONS),
                        chunk_ids=rng.sample(chunk_ids, rng.randint(1, len(chunk_ids))),
                    )
    return DocumentGraph(
        kb_id=kb_id, doc_id=doc_id, schema_version=1,
        chunks=[GraphChunk(id=cid, ordinal=i) for i, cid in enumerate(chunk_ids)],
        entities=list(entities.values()), relationships=list(relationships.values()),
    )


@pytest.mark.slow  # about 30 s of generated histories
def test_neo4j_and_the_embedded_store_agree_on_random_histories(tmp_path: Path, kb_id: str) -> None:
    from lumikb_pipeline_tests.graph.conftest import neo4j_store

    stores: list[GraphStore] = [neo4j_store(), EmbeddedGraphStore(tmp_path / "graph.sqlite3")]
    rng = random.Random(20261129)
    long_merge_seen = False
    for step in range(80):
        doc_id = rng.choice(["d1", "d2", "d3", "d4"])
        roll = rng.random()
        if roll < 0.15:
            summaries = [store.remove_document(kb_id, doc_id) for store in stores]
        else:
            mode: WriteMode = "merge" if roll < 0.5 else "replace"
            graph = random_graph(rng, kb_id, doc_id)
            summaries = [store.write_document(graph, SCHEMA, mode) for store in stores]
        assert summaries[0] == summaries[1], f"step {step}"
        neo4j_dump, embedded_dump = (store.dump(kb_id) for store in stores)
        assert neo4j_dump == embedded_dump, f"step {step}"
        long_merge_seen = long_merge_seen or any(
            len(n["properties"].get("description", "")) == MAX_MERGED_DESCRIPTION for n in neo4j_dump.nodes
        )
    for store in stores:
        assert all(report.ok for report in check_invariants(store, kb_id))
    assert long_merge_seen, "the history never merged descriptions past the bound; change the seed"
