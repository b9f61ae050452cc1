"""Graph-write benchmark: the batched Neo4j store against a naive one-query-per-item writer.

    python -m benchmarks.graph_writes            # 200 documents, 10,000 entities, 20,000 relationships
    python -m benchmarks.graph_writes --quick    # 10 documents, for a smoke run

Both writers run in the same process against the Neo4j of `LUMIKB_NEO4J_URI` (see
`scripts/services env`), each into a KB of its own that is deleted afterwards, on the same generated
documents: every document has 5 chunks, 50 entities (10 per chunk) and 100 relationships (20 per
chunk, between entities of the chunk).

- batched: `Neo4jGraphStore.write_document(..., "replace")`, one transaction per document with
  `UNWIND` batches, documents spread over `--workers` threads (as several workers would);
- naive: what STYLE.md's counter-example does, one auto-commit query (so one transaction) per
  document, chunk, entity and relationship, on the same number of threads.

The two take turns on blocks of 20 documents (same data, same conditions), and each one's total
time over all blocks is compared.

It prints a table and writes `benchmarks/results/graph_writes.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.domain.results import (
    ChunkExtraction,
    DocumentGraph,
    ExtractedEntity,
    ExtractedRelationship,
    GraphChunk,
)
from lumikb_pipeline.domain.schema import DomainSchema, EntityType, RelationshipType
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore

RESULTS = Path(__file__).resolve().parent / "results" / "graph_writes.json"
CHUNKS_PER_DOCUMENT = 5
ORGANIZATIONS_PER_CHUNK = 5
PEOPLE_PER_CHUNK = 5
RELATIONSHIPS_PER_CHUNK = 20  # of the 25 (organization, person) pairs of a chunk
WARM_UP_DOCUMENTS = 30  # per writer, into KBs of their own, not timed

SCHEMA = DomainSchema(
    entity_types=(EntityType(name="Organization"), EntityType(name="Person")),
    relationship_types=(RelationshipType(name="EMPLOYS", source=("Organization",), target=("Person",)),),
)

# --- the naive baseline: one auto-commit query per item (deliberately; do not copy) --------------

NAIVE_DOCUMENT = "MERGE (d:Document {kb_id: $kb_id, id: $doc_id}) SET d.schema_version = $schema_version"
NAIVE_CHUNK = """
MATCH (d:Document {kb_id: $kb_id, id: $doc_id})
MERGE (c:Chunk {kb_id: $kb_id, id: $chunk_id}) SET c.doc_id = $doc_id, c.ordinal = $ordinal
MERGE (d)-[:HAS_CHUNK]->(c)
"""
NAIVE_ENTITY = """
MERGE (e:Entity {kb_id: $kb_id, type: $type, key: $key})
SET e.name = $name, e.description = $description
WITH e
UNWIND $chunk_ids AS chunk_id
MATCH (c:Chunk {kb_id: $kb_id, id: chunk_id})
MERGE (c)-[:MENTIONS]->(e)
"""
NAIVE_RELATIONSHIP = """
MATCH (a:Entity {kb_id: $kb_id, type: $source_type, key: $source_key})
MATCH (b:Entity {kb_id: $kb_id, type: $target_type, key: $target_key})
MERGE (a)-[r:$($type)]->(b)
SET r.type = $type, r.kb_id = $kb_id, r.description = $description, r.chunk_ids = $chunk_ids
"""


def write_naively(store: Neo4jGraphStore, graph: DocumentGraph) -> None:
    """One auto-commit query per document, chunk, entity and relationship."""
    driver, database = store._driver, store.database
    base = {"kb_id": graph.kb_id, "doc_id": graph.doc_id}
    with driver.session(database=database) as session:
        session.run(NAIVE_DOCUMENT, base, schema_version=graph.schema_version).consume()
        for chunk in graph.chunks:
            session.run(NAIVE_CHUNK, base, chunk_id=chunk.id, ordinal=chunk.ordinal).consume()
        for entity in graph.entities:
            session.run(
                NAIVE_ENTITY, base, type=entity.type, key=entity.key, name=entity.name,
                description=entity.description, chunk_ids=entity.chunk_ids,
            ).consume()
        for rel in graph.relationships:
            session.run(
                NAIVE_RELATIONSHIP, base, type=rel.type, source_type=rel.source.type, source_key=rel.source.key,
                target_type=rel.target.type, target_key=rel.target.key, description=rel.description,
                chunk_ids=rel.chunk_ids,
            ).consume()


# --- data --------------------------------------------------------------------------------------


def make_documents(kb_id: str, documents: int) -> list[DocumentGraph]:
    """The benchmark corpus, built the production way (`build_document_graph`) from extractions."""
    graphs = []
    for d in range(documents):
        doc_id = f"doc-{d:05d}"
        chunks, extractions = [], []
        for c in range(CHUNKS_PER_DOCUMENT):
            chunk_id = f"{doc_id}:{c}"
            orgs = [f"Organization {d}-{c}-{i}" for i in range(ORGANIZATIONS_PER_CHUNK)]
            people = [f"Person {d}-{c}-{i}" for i in range(PEOPLE_PER_CHUNK)]
            pairs = [(o, p) for o in orgs for p in people][:RELATIONSHIPS_PER_CHUNK]
            chunks.append(GraphChunk(id=chunk_id, ordinal=c))
            extractions.append(ChunkExtraction(
                chunk_id=chunk_id,
                entities=[ExtractedEntity(name=n, type="Organization", description=f"{n} makes things.")
                          for n in orgs]
                + [ExtractedEntity(name=n, type="Person", description=f"{n} works.") for n in people],
                relationships=[
                    ExtractedRelationship(source=o, source_type="Organization", target=p, target_type="Person",
                                          type="EMPLOYS", description=f"{o} employs {p}.")
                    for o, p in pairs
                ],
            ))
        graphs.append(build_document_graph(kb_id, doc_id, 1, chunks, extractions))
    return graphs


# --- running -----------------------------------------------------------------------------------


_KB_NODES = {  # each label's nodes of one KB, found through its uniqueness constraint's index
    "Entity": "(n:Entity {kb_id: $kb_id} WHERE n.type IS NOT NULL AND n.key IS NOT NULL)",
    "Chunk": "(n:Chunk {kb_id: $kb_id} WHERE n.id IS NOT NULL)",
    "Document": "(n:Document {kb_id: $kb_id} WHERE n.id IS NOT NULL)",
}


def _delete_kb(store: Neo4jGraphStore, kb_id: str) -> None:
    with store._driver.session(database=store.database) as session:
        for pattern in _KB_NODES.values():
            # Batched deletes: one transaction per 2,000 nodes keeps memory bounded.
            session.run(
                f"MATCH {pattern} CALL (n) {{ DETACH DELETE n }} IN TRANSACTIONS OF 2000 ROWS", kb_id=kb_id
            ).consume()


def _write_all(graphs: Sequence[DocumentGraph], write: Callable[[DocumentGraph], object], workers: int) -> float:
    """Seconds to write `graphs` with `workers` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(write, graphs):
            pass
    return time.perf_counter() - started


def _rates(store: Neo4jGraphStore, graphs: Sequence[DocumentGraph], seconds: float) -> dict[str, Any]:
    """Throughput of one writer, after checking that it wrote exactly the expected graph."""
    kb_id = graphs[0].kb_id
    counts = store.counts(kb_id)
    entities = sum(len(g.entities) for g in graphs)
    relationships = sum(len(g.relationships) for g in graphs)
    if (counts.entities, counts.relationships) != (entities, relationships):
        raise SystemExit(f"{kb_id}: wrote {counts}, expected {entities} entities and {relationships} relationships")
    return {
        "seconds": round(seconds, 3),
        "documents_per_s": round(len(graphs) / seconds, 1),
        "entities_per_s": round(entities / seconds, 1),
        "relationships_per_s": round(relationships / seconds, 1),
        "graph": counts.model_dump(),
    }


def run(documents: int, workers: int, output: Path, block: int = 20) -> dict[str, Any]:
    """Run both writers on `documents` generated documents; write and return the JSON result."""
    settings = load_settings()
    if not settings.neo4j_uri:
        raise SystemExit('LUMIKB_NEO4J_URI is not set: run `scripts/services up` and `eval "$(scripts/services env)"`')
    password = settings.neo4j_password.get_secret_value() if settings.neo4j_password else ""
    store = Neo4jGraphStore(settings.neo4j_uri, settings.neo4j_user, password, database=settings.neo4j_database)
    store.ensure_schema()

    suffix = uuid.uuid4().hex[:8]
    batched_kb, naive_kb, warmup_kb = f"bench-batched-{suffix}", f"bench-naive-{suffix}", f"bench-warmup-{suffix}"
    batched_docs = make_documents(batched_kb, documents)
    naive_docs = [g.model_copy(update={"kb_id": naive_kb}) for g in batched_docs]
    try:
        # Warm-up: Neo4j plans each query once and the JVM compiles hot paths (a few hundred
        # transactions of each kind before the code is compiled); neither writer should pay for that
        # inside its timing. On a just-started Neo4j, 2 documents left the batched writer 1.5x slower.
        for graph in make_documents(warmup_kb, WARM_UP_DOCUMENTS):
            store.write_document(graph, SCHEMA, "replace")
            write_naively(store, graph.model_copy(update={"kb_id": warmup_kb + "-n"}))
        # The writers take turns on blocks of documents, so that both see the same machine conditions
        # (a shared machine's load varies over a minute more than the effect being measured).
        batched_s = naive_s = 0.0
        load_before = os.getloadavg()[0]
        for start in range(0, documents, block):
            batched_s += _write_all(
                batched_docs[start:start + block], lambda g: store.write_document(g, SCHEMA, "replace"), workers
            )
            naive_s += _write_all(naive_docs[start:start + block], lambda g: write_naively(store, g), workers)
        load_after = os.getloadavg()[0]
        batched, naive = _rates(store, batched_docs, batched_s), _rates(store, naive_docs, naive_s)
    finally:
        for kb_id in (batched_kb, naive_kb, warmup_kb, warmup_kb + "-n"):
            _delete_kb(store, kb_id)

    server = store._driver.get_server_info().agent
    result = {
        "benchmark": "graph_writes",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
        },
        "neo4j": server,
        "driver_rust_extension": _has_rust_extension(),
        "config": {
            "documents": documents,
            "chunks_per_document": CHUNKS_PER_DOCUMENT,
            "entities": sum(len(g.entities) for g in batched_docs),
            "relationships": sum(len(g.relationships) for g in batched_docs),
            "workers": workers,
            "block": block,
        },
        "batched": batched,
        "naive": naive,
        "ratio": round(naive["seconds"] / batched["seconds"], 2),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _has_rust_extension() -> bool:
    try:
        import neo4j._rust  # noqa: F401 - only present with the neo4j-rust-ext package
    except ImportError:
        return False
    return True


def print_table(result: dict[str, Any]) -> None:
    """A readable summary of one result."""
    from rich.console import Console
    from rich.table import Table

    config = result["config"]
    table = Table(
        title=f"Graph writes: {config['documents']} documents, {config['entities']:,} entities, "
        f"{config['relationships']:,} relationships, {config['workers']} worker thread(s) — {result['neo4j']}"
    )
    for column in ("writer", "seconds", "documents/s", "entities/s", "relationships/s"):
        table.add_column(column, justify="right" if column != "writer" else "left")
    for name, label in (("batched", "batched (UNWIND, 1 tx/document)"), ("naive", "naive (1 query/item)")):
        row = result[name]
        table.add_row(label, f"{row['seconds']:.2f}", f"{row['documents_per_s']:,.1f}",
                      f"{row['entities_per_s']:,.0f}", f"{row['relationships_per_s']:,.0f}")
    console = Console()
    console.print(table)
    console.print(f"batched is [bold]{result['ratio']}x[/bold] faster than naive")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph_writes", description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=200, help="documents to write (default 200)")
    parser.add_argument("--quick", action="store_true", help="a small run: 10 documents")
    parser.add_argument("--workers", type=int, default=4, help="writer threads for both writers (default 4)")
    parser.add_argument("--block", type=int, default=20, help="documents per turn of each writer (default 20)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON result file (default {RESULTS})")
    args = parser.parse_args(argv)
    documents = 10 if args.quick else args.documents
    if min(documents, args.workers, args.block) < 1:
        parser.error("--documents, --workers and --block must be at least 1")
    print_table(run(documents, args.workers, args.output, args.block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
