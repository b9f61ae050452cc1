"""Graph-write benchmark: the Neo4j store against two bounds and a naive writer.

    python -m benchmarks.graph_writes            # 2,000 documents in 5 rounds (naive: 200), ~100,000 entities
    python -m benchmarks.graph_writes --quick    # 40 documents in 2 rounds, for a smoke run

All writers run in the same process against the Neo4j of `LUMIKB_NEO4J_URI` (see
`scripts/services env`), each into a KB of its own that is deleted afterwards, on the same generated
documents: every document has 5 chunks, 50 entities (10 per chunk) and 100 relationships (20 per
chunk, between entities of the chunk).

- store: `Neo4jGraphStore.write_document(..., "replace")`, one transaction per document, documents
  spread over `--workers` threads (as several workers would);
- lower bound: one `UNWIND` … `CREATE` query per document that writes the same nodes, relationships,
  provenance records (`Asserts` edges) and properties (aggregates included) with no `MERGE`, no reads
  and no provenance merging: what the data volume alone costs; not a valid writer (neither idempotent
  nor merging);
- idempotent bound: the same query with `MERGE` in place of every `CREATE`: what writing the same
  data idempotently costs when nothing is read first; writing a document again changes nothing, but
  it neither merges provenance across documents nor removes what a new version dropped, so it is not
  a valid writer either;
- naive: what STYLE.md's counter-example does, one auto-commit query (so one transaction) per
  document, chunk, entity and relationship, on the same number of threads, on a sample of the
  documents (`--naive-documents`: it is 20 times slower).

The run is split into `--rounds`; in each, the writers take turns on blocks of 20 documents (same
data, same conditions). Each round gives each writer a rate and its CPU time per document: this
process's (the client's, every thread) and, when Neo4j runs on this machine, the server's (read
from its process). The result is the median over the rounds with its spread (min and max), and the
ratios are of medians.

It prints a table and writes `benchmarks/results/graph_writes.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import (
    ChunkExtraction,
    DocumentGraph,
    ExtractedEntity,
    ExtractedRelationship,
    GraphChunk,
)
from lumikb_pipeline.domain.schema import DomainSchema, EntityType, RelationshipType
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.merging import provenance_text
from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore
from lumikb_pipeline.graph.plan import entity_state, relationship_state
from lumikb_pipeline.orchestration import processes
from lumikb_pipeline_tests.graph.conftest import delete_kbs

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


# --- the lower bound: one create-only query per document -----------------------------------------

LOWER_BOUND_DOCUMENT = """
CREATE (d:Document {kb_id: $kb_id, id: $doc_id, schema_version: $schema_version})
WITH d
CALL (d) {
  UNWIND $chunks AS c
  CREATE (d)-[:HAS_CHUNK]->(chunk:Chunk {kb_id: $kb_id, id: c[0], doc_id: $doc_id, ordinal: c[1]})
  RETURN collect(chunk) AS chunks
}
CALL () {
  UNWIND $entities AS e
  CREATE (n:Entity {kb_id: $kb_id, type: e[0], key: e[1], name: e[2], description: e[3], aggregate: e[4]})
  RETURN collect(n) AS nodes
}
CALL (chunks, nodes) {
  UNWIND $mentions AS m
  WITH chunks[m[0]] AS chunk, nodes[m[1]] AS n, m
  CREATE (chunk)-[:MENTIONS {names: m[2], descriptions: m[3]}]->(n)
}
CALL (chunks, nodes) {
  UNWIND $relationships AS r
  WITH nodes[r[0]] AS a, nodes[r[1]] AS b, r
  CREATE (a)-[:EMPLOYS {type: 'EMPLOYS', kb_id: $kb_id, description: r[2], aggregate: r[3]}]->(b)
  WITH a, b, r
  UNWIND r[4] AS source
  WITH a, b, chunks[source] AS chunk, r
  CREATE (chunk)-[:Asserts {type: 'EMPLOYS', target_type: b.type, target_key: b.key, description: r[2]}]->(a)
}
"""


# The same, idempotent: MERGE in place of every CREATE (still one query, no reads before it).
IDEMPOTENT_BOUND_DOCUMENT = """
MERGE (d:Document {kb_id: $kb_id, id: $doc_id})
SET d.schema_version = $schema_version
WITH d
CALL (d) {
  UNWIND $chunks AS c
  MERGE (chunk:Chunk {kb_id: $kb_id, id: c[0]})
  SET chunk.doc_id = $doc_id, chunk.ordinal = c[1]
  MERGE (d)-[:HAS_CHUNK]->(chunk)
  RETURN collect(chunk) AS chunks
}
CALL () {
  UNWIND $entities AS e
  MERGE (n:Entity {kb_id: $kb_id, type: e[0], key: e[1]})
  SET n.name = e[2], n.description = e[3], n.aggregate = e[4]
  RETURN collect(n) AS nodes
}
CALL (chunks, nodes) {
  UNWIND $mentions AS m
  WITH chunks[m[0]] AS chunk, nodes[m[1]] AS n, m
  MERGE (chunk)-[mention:MENTIONS]->(n)
  SET mention.names = m[2], mention.descriptions = m[3]
}
CALL (chunks, nodes) {
  UNWIND $relationships AS r
  WITH nodes[r[0]] AS a, nodes[r[1]] AS b, r
  MERGE (a)-[rel:EMPLOYS]->(b)
  SET rel.type = 'EMPLOYS', rel.kb_id = $kb_id, rel.description = r[2], rel.aggregate = r[3]
  WITH a, b, r
  UNWIND r[4] AS source
  WITH a, b, chunks[source] AS chunk, r
  MERGE (chunk)-[:Asserts {type: 'EMPLOYS', target_type: b.type, target_key: b.key, description: r[2]}]->(a)
}
"""


def _bound_parameters(graph: DocumentGraph) -> dict[str, Any]:
    """The parameters of both bounds' query: the same nodes, relationships, provenance records and
    properties as the store writes for a new document (its aggregates included, computed by the same
    functions)."""
    chunk_index = {chunk.id: i for i, chunk in enumerate(graph.chunks)}
    entity_index = {(e.type, e.key): i for i, e in enumerate(graph.entities)}
    entities, mentions = [], []
    for i, e in enumerate(graph.entities):
        descriptions = [e.description] if e.description.strip() else []
        state = entity_state([(frozenset({e.name}), frozenset(descriptions))] * len(e.chunk_ids))
        assert state is not None
        entities.append([e.type, e.key, state.name, state.description, state.aggregate_json()])
        mentions += [[chunk_index[c], i, [e.name], descriptions] for c in e.chunk_ids]
    relationships = []
    for r in graph.relationships:
        rel = relationship_state((c, provenance_text(r.description)) for c in r.chunk_ids)
        assert rel is not None
        relationships.append([entity_index[(r.source.type, r.source.key)], entity_index[(r.target.type, r.target.key)],
                              rel.description, rel.aggregate_json(), [chunk_index[c] for c in r.chunk_ids]])
    return {
        "kb_id": graph.kb_id, "doc_id": graph.doc_id, "schema_version": graph.schema_version,
        "chunks": [[chunk.id, chunk.ordinal] for chunk in graph.chunks], "entities": entities, "mentions": mentions,
        "relationships": relationships,
    }


def write_bound(store: Neo4jGraphStore, graph: DocumentGraph, query: str) -> None:
    """One auto-commit query per document (`LOWER_BOUND_DOCUMENT` or `IDEMPOTENT_BOUND_DOCUMENT`)."""
    with store._driver.session(database=store.database) as session:
        session.run(query, _bound_parameters(graph)).consume()


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


def _neo4j_server_process(uri: str) -> psutil.Process | None:
    """The process of the Neo4j server at `uri` when it listens on this machine (its CPU time is
    read from it), else None."""
    address = urlsplit(uri)
    if address.hostname not in {"localhost", "127.0.0.1", "::1"}:
        return None
    pids = processes.listening_pids(address.port or 7687)
    if not pids or len(pids) > 1:  # not visible, or not one process to read
        return None
    try:
        return psutil.Process(pids.pop())
    except psutil.Error:
        return None


def _cpu_seconds(process: psutil.Process | None) -> float | None:
    if process is None:
        return None
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _write_all(
    graphs: Sequence[DocumentGraph], write: Callable[[DocumentGraph], object], workers: int,
    server: psutil.Process | None,
) -> tuple[float, float, float | None]:
    """Wall seconds, this process's CPU seconds (every thread) and the Neo4j server's (None when it is
    not on this machine) to write `graphs` with `workers` threads."""
    server_before = _cpu_seconds(server)
    client_before = time.process_time()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(write, graphs):
            pass
    seconds = time.perf_counter() - started
    client = time.process_time() - client_before
    server_after = _cpu_seconds(server)
    return seconds, client, None if server_before is None or server_after is None else server_after - server_before


def _rates(store: Neo4jGraphStore, graphs: Sequence[DocumentGraph], rounds: Sequence[dict[str, Any]]) -> dict[
    str, Any
]:
    """One writer's rates and CPU time per document per round (median, min, max), after checking that
    it wrote exactly the expected graph."""
    kb_id = graphs[0].kb_id
    counts = store.counts(kb_id)
    entities_per_document = sum(len(g.entities) for g in graphs) / len(graphs)
    relationships = sum(len(g.relationships) for g in graphs)
    if (counts.entities, counts.relationships) != (round(entities_per_document * len(graphs)), relationships):
        raise SystemExit(f"{kb_id}: wrote {counts}, expected {entities_per_document * len(graphs):.0f} entities and "
                         f"{relationships} relationships")
    documents_per_s = [r["documents"] / r["seconds"] for r in rounds if r["seconds"] > 0]
    seconds = sum(r["seconds"] for r in rounds)
    server = [r["server_cpu_s"] for r in rounds]
    return {
        "seconds": round(seconds, 3),
        "documents": len(graphs),
        "documents_per_s": _median_and_spread(documents_per_s),
        "entities_per_s": _median_and_spread([d * entities_per_document for d in documents_per_s]),
        "cpu_ms_per_document": {
            "client": round(statistics.median(1000 * r["client_cpu_s"] / r["documents"] for r in rounds), 2),
            "neo4j": None if None in server else round(
                statistics.median(1000 * r["server_cpu_s"] / r["documents"] for r in rounds), 2),
        },
        "rounds": list(rounds),
        "graph": counts.model_dump(),
    }


WRITERS = ("store", "idempotent_bound", "lower_bound", "naive")


def _median_and_spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def run(
    documents: int, workers: int, output: Path, block: int = 20, rounds: int = 5, naive_documents: int | None = None
) -> dict[str, Any]:
    """Run the writers over `rounds` rounds; write and return the JSON result."""
    settings = load_settings()
    if not settings.neo4j_uri:
        raise SystemExit('LUMIKB_NEO4J_URI is not set: run `scripts/services up` and `eval "$(scripts/services env)"`')
    password = settings.neo4j_password.get_secret_value() if settings.neo4j_password else ""
    store = Neo4jGraphStore(settings.neo4j_uri, settings.neo4j_user, password, database=settings.neo4j_database)
    store.ensure_schema()
    naive_documents = min(documents, naive_documents or documents)

    suffix = uuid.uuid4().hex[:8]
    kbs = {writer: f"bench-{writer.replace('_', '-')}-{suffix}" for writer in WRITERS}
    warmup_kb = f"bench-warmup-{suffix}"
    corpus = make_documents(kbs["store"], documents)
    docs = {writer: [g.model_copy(update={"kb_id": kb}) for g in corpus] for writer, kb in kbs.items()}
    docs["naive"] = docs["naive"][:naive_documents]
    write: dict[str, Callable[[DocumentGraph], object]] = {
        "store": lambda g: store.write_document(g, SCHEMA, WriteMode.REPLACE),
        "idempotent_bound": lambda g: write_bound(store, g, IDEMPOTENT_BOUND_DOCUMENT),
        "lower_bound": lambda g: write_bound(store, g, LOWER_BOUND_DOCUMENT),
        "naive": lambda g: write_naively(store, g),
    }
    per_round: dict[str, list[dict[str, Any]]] = {writer: [] for writer in WRITERS}
    neo4j_process = _neo4j_server_process(settings.neo4j_uri)
    try:
        # Warm-up: Neo4j plans each query once and the JVM compiles hot paths (a few hundred
        # transactions of each kind before the code is compiled); no writer should pay for that
        # inside its timing.
        for writer in WRITERS:
            for graph in make_documents(f"{warmup_kb}-{writer}", WARM_UP_DOCUMENTS):
                write[writer](graph)
        load_before = os.getloadavg()[0]
        for r in range(rounds):
            count = dict.fromkeys(WRITERS, 0)
            for writer in WRITERS:
                share = len(docs[writer]) // rounds
                start = r * share
                stop = len(docs[writer]) if r == rounds - 1 else start + share
                docs_of_round = docs[writer][start:stop]
                count[writer] = len(docs_of_round)
                per_round[writer].append(
                    {"documents": len(docs_of_round), "seconds": 0.0, "client_cpu_s": 0.0, "server_cpu_s": 0.0})
            # The writers take turns on blocks of documents, so that all see the same machine conditions.
            position = dict.fromkeys(WRITERS, 0)
            while any(position[w] < count[w] for w in WRITERS):
                for writer in WRITERS:
                    if position[writer] >= count[writer]:
                        continue
                    share = len(docs[writer]) // rounds
                    start = r * share + position[writer]
                    take = min(block if writer != "naive" else max(1, block // 10), count[writer] - position[writer])
                    seconds, client_cpu, server_cpu = _write_all(
                        docs[writer][start:start + take], write[writer], workers, neo4j_process)
                    position[writer] += take
                    totals = per_round[writer][-1]
                    totals["seconds"] += seconds
                    totals["client_cpu_s"] += client_cpu
                    # One block whose server CPU could not be read leaves the round's unknown.
                    totals["server_cpu_s"] = (None if server_cpu is None or totals["server_cpu_s"] is None
                                              else totals["server_cpu_s"] + server_cpu)
            for writer in WRITERS:
                totals = per_round[writer][-1]
                for key in ("seconds", "client_cpu_s", "server_cpu_s"):
                    if totals[key] is not None:
                        totals[key] = round(totals[key], 3)
        load_after = os.getloadavg()[0]
        results = {writer: _rates(store, docs[writer], per_round[writer]) for writer in WRITERS}
    finally:
        delete_kbs(store, [*kbs.values(), *(f"{warmup_kb}-{w}" for w in WRITERS)])

    def doc_seconds(writer: str) -> float:
        return statistics.median(r["seconds"] / r["documents"] for r in per_round[writer])

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
            "naive_documents": naive_documents,
            "rounds": rounds,
            "chunks_per_document": CHUNKS_PER_DOCUMENT,
            "entities": sum(len(g.entities) for g in corpus),
            "relationships": sum(len(g.relationships) for g in corpus),
            "workers": workers,
            "block": block,
        },
        **results,
        # Ratios of medians of the per-document time.
        "ratio": round(doc_seconds("naive") / doc_seconds("store"), 2),
        "share_of_lower_bound": round(doc_seconds("lower_bound") / doc_seconds("store"), 3),
        "share_of_idempotent_bound": round(doc_seconds("idempotent_bound") / doc_seconds("store"), 3),
        "idempotent_bound_share_of_lower_bound": round(doc_seconds("lower_bound") / doc_seconds("idempotent_bound"), 3),
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
        title=f"Graph writes: {config['documents']} documents ({config['entities']:,} entities, "
        f"{config['relationships']:,} relationships) in {config['rounds']} round(s), naive on "
        f"{config['naive_documents']}, {config['workers']} worker thread(s) — {result['neo4j']}; CPU in ms per document"
    )
    for column in ("writer", "documents", "seconds", "entities/s median", "min", "max", "client CPU", "Neo4j CPU"):
        table.add_column(column, justify="right" if column != "writer" else "left")
    labels = {"store": "store", "idempotent_bound": "idempotent bound", "lower_bound": "lower bound",
              "naive": "naive"}
    for name in WRITERS:
        row = result[name]
        rate, cpu = row["entities_per_s"], row["cpu_ms_per_document"]
        table.add_row(labels[name], str(row["documents"]), f"{row['seconds']:.2f}", f"{rate['median']:,.0f}",
                      f"{rate['min']:,.0f}", f"{rate['max']:,.0f}", f"{cpu['client']:.2f}",
                      "–" if cpu["neo4j"] is None else f"{cpu['neo4j']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"the store is {result['ratio']}x faster than naive and reaches "
                  f"{result['share_of_lower_bound']:.0%} of the lower bound and "
                  f"{result['share_of_idempotent_bound']:.0%} of the idempotent bound, which reaches "
                  f"{result['idempotent_bound_share_of_lower_bound']:.0%} of the lower bound (medians)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph_writes", description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=2000, help="documents per writer (default 2000)")
    parser.add_argument("--naive-documents", type=int, default=200, help="documents of the naive writer (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="a small run: 40 documents in 2 rounds")
    parser.add_argument("--workers", type=int, default=4, help="writer threads for every writer (default 4)")
    parser.add_argument("--block", type=int, default=20, help="documents per turn of each writer (default 20)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON result file (default {RESULTS})")
    args = parser.parse_args(argv)
    documents, rounds = (40, 2) if args.quick else (args.documents, args.rounds)
    naive = min(documents, 20 if args.quick else args.naive_documents)
    if min(documents, args.workers, args.block, rounds, naive) < 1 or naive < rounds or documents < rounds:
        parser.error("--documents, --naive-documents, --workers, --block and --rounds must be at least 1, "
                     "and each writer needs a document per round")
    print_table(run(documents, args.workers, args.output, args.block, rounds, naive))
    return 0


if __name__ == "__main__":
    sys.exit(main())
