"""Hub benchmark: N documents that all mention the same company, person and city; does a document's
write cost the same at the first document and at the last?

    python -m benchmarks.hub_writes                       # 100,000 documents on Neo4j and the embedded store
    python -m benchmarks.hub_writes --quick               # 1,000 documents
    python -m benchmarks.hub_writes --documents 20000 --stores neo4j

Every document is short (one chunk) and, as in real corpora, names the same three entities (the
company `Acme Corp`, its employee `Jane Doe`, the city `Springfield`) plus a person of its own, with
descriptions of its own (so the hubs gather one distinct description per document):
`Acme Corp -EMPLOYS-> Jane Doe` (the hub pair: one relationship with a provenance record per
document), `Jane Doe -LIVES_IN-> Springfield`, `Acme Corp -EMPLOYS-> Person i` and
`Person i -LIVES_IN-> Springfield` (hubs with one more relationship per document).

Documents are written one by one (`write_document(..., "replace")`, one writer, as one worker
would), each timed. The figure is the ratio of the median per-document write time in the last 10%
of the documents to that in the first 10% (flat: <= 1.5). When provenance was kept as lists on the
relationships, every write read and rewrote them: the time grew with the number of documents and
Neo4j ran out of transaction memory after about 1,300 such documents.

After the writes the run re-extracts (`replace`, with new descriptions) and then removes 1% of the
documents, timing them too, and checks the result exactly: the hub relationship's provenance has one
record per remaining document, and the hub entity's description and the hub relationship's
description equal the merge of the remaining documents' descriptions computed here.

It writes into a KB of its own that is deleted afterwards, prints a table and writes
`benchmarks/results/hub_writes.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.merging import merge_descriptions
from lumikb_pipeline.graph.neo4j_store import Neo4jGraphStore
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline_tests.graph.conftest import delete_kbs

RESULTS = Path(__file__).resolve().parent / "results" / "hub_writes.json"
STORES = ("neo4j", "embedded")
FLAT_RATIO = 1.5  # target: last 10% / first 10% of the median per-document write time
REVISITED_SHARE = 0.01  # documents re-extracted, then removed, at the end

SCHEMA = DomainSchema(
    entity_types=(EntityType(name="Organization"), EntityType(name="Person"), EntityType(name="City")),
    relationship_types=(
        RelationshipType(name="EMPLOYS", source=("Organization",), target=("Person",)),
        RelationshipType(name="LIVES_IN", source=("Person",), target=("City",)),
    ),
)


def company_description(d: int, version: int) -> str:
    return f"Acme Corp, as document {d} describes it (extraction {version})."


def pair_description(d: int, version: int) -> str:
    return f"Jane Doe works at Acme Corp (document {d}, extraction {version})."


def make_document(kb_id: str, d: int, version: int = 1) -> DocumentGraph:
    """Document `d`, built the production way (`build_document_graph`) from one chunk's extraction."""
    doc_id = f"doc-{d:06d}"
    chunk_id = f"{doc_id}:0"
    person = f"Person {d}"
    extraction = ChunkExtraction(
        chunk_id=chunk_id,
        entities=[
            ExtractedEntity(name="Acme Corp", type="Organization", description=company_description(d, version)),
            ExtractedEntity(name="Jane Doe", type="Person", description="An engineer."),
            ExtractedEntity(name="Springfield", type="City", description="A city."),
            ExtractedEntity(name=person, type="Person", description=f"{person} is named in document {d}."),
        ],
        relationships=[
            ExtractedRelationship(source="Acme Corp", source_type="Organization", target="Jane Doe",
                                  target_type="Person", type="EMPLOYS", description=pair_description(d, version)),
            ExtractedRelationship(source="Jane Doe", source_type="Person", target="Springfield", target_type="City",
                                  type="LIVES_IN", description="She lives there."),
            ExtractedRelationship(source="Acme Corp", source_type="Organization", target=person,
                                  target_type="Person", type="EMPLOYS", description=""),
            ExtractedRelationship(source=person, source_type="Person", target="Springfield", target_type="City",
                                  type="LIVES_IN", description=""),
        ],
    )
    return build_document_graph(kb_id, doc_id, 1, [GraphChunk(id=chunk_id, ordinal=0)], [extraction])


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values) * 1000, 3),
        "mean": round(statistics.fmean(values) * 1000, 3),
        "p95": round(sorted(values)[int(0.95 * (len(values) - 1))] * 1000, 3),
    }


def _timed(store: GraphStore, graphs: Sequence[DocumentGraph]) -> list[float]:
    seconds = []
    for graph in graphs:
        started = time.perf_counter()
        store.write_document(graph, SCHEMA, WriteMode.REPLACE)
        seconds.append(time.perf_counter() - started)
    return seconds


HUB_NEO4J = """
MATCH (acme:Entity {kb_id: $kb_id, type: 'Organization', key: 'acme corp'})
MATCH (jane:Entity {kb_id: $kb_id, type: 'Person', key: 'jane doe'})
MATCH (acme)-[r:EMPLOYS]->(jane)
RETURN acme.description AS entity_description, r.description AS pair_description,
       COLLECT { MATCH (c:Chunk)-[s:Asserts]->(acme)
                 WHERE s.type = 'EMPLOYS' AND s.target_type = 'Person' AND s.target_key = 'jane doe'
                 RETURN c.id } AS pair_chunks
"""
HUB_EMBEDDED = (
    "SELECT (SELECT description FROM entities WHERE kb_id = :kb AND type = 'Organization' AND key = 'acme corp'), "
    "(SELECT description FROM relationships WHERE kb_id = :kb AND type = 'EMPLOYS' AND source_key = 'acme corp' "
    " AND target_key = 'jane doe'), "
    "(SELECT json_group_array(chunk_id) FROM relationship_sources WHERE kb_id = :kb AND type = 'EMPLOYS' "
    " AND source_key = 'acme corp' AND target_key = 'jane doe')"
)


def _hub(store: GraphStore, kb_id: str) -> tuple[str, str, list[str]]:
    """The hub entity's description, the hub pair's description and its records' chunk ids, read
    with targeted queries (a dump of 100,000 documents would not fit in memory)."""
    if isinstance(store, Neo4jGraphStore):
        records, _, _ = store._driver.execute_query(HUB_NEO4J, kb_id=kb_id, database_=store.database)
        row = records[0]
        return row["entity_description"], row["pair_description"], list(row["pair_chunks"])
    assert isinstance(store, EmbeddedGraphStore)
    import sqlite3

    with sqlite3.connect(store.path) as conn:
        entity, pair, chunks = conn.execute(HUB_EMBEDDED, {"kb": kb_id}).fetchone()
    return entity, pair, json.loads(chunks)


def _check(store: GraphStore, kb_id: str, remaining: dict[int, int]) -> dict[str, Any]:
    """The hubs hold exactly the provenance of the remaining documents (`remaining`: document ->
    extraction version); raises SystemExit otherwise."""
    entity_description, pair_description_stored, pair_chunks = _hub(store, kb_id)
    expected_chunks = sorted(f"doc-{d:06d}:0" for d in remaining)
    problems = []
    if sorted(pair_chunks) != expected_chunks:
        problems.append(f"hub pair has {len(pair_chunks)} records, expected {len(expected_chunks)}")
    if pair_description_stored != merge_descriptions(pair_description(d, v) for d, v in remaining.items()):
        problems.append("hub pair description differs from the merge of the remaining documents'")
    if entity_description != merge_descriptions(company_description(d, v) for d, v in remaining.items()):
        problems.append("hub entity description differs from the merge of the remaining documents'")
    counts = store.counts(kb_id)
    expected_relationships = 2 + 2 * len(remaining)
    if counts.relationships != expected_relationships or counts.documents != len(remaining):
        problems.append(f"counts {counts}, expected {len(remaining)} documents, {expected_relationships} relationships")
    if problems:
        raise SystemExit(f"{kb_id}: " + "; ".join(problems))
    return {"hub_pair_records": len(pair_chunks), "graph": counts.model_dump()}


def run_store(name: str, store: GraphStore, documents: int) -> dict[str, Any]:
    """Write `documents` hub documents into a new KB of `store`; time and check them."""
    kb_id = f"bench-hub-{uuid.uuid4().hex[:8]}"
    warm_up_kb = f"{kb_id}-warm-up"
    try:
        _timed(store, [make_document(warm_up_kb, d) for d in range(50)])  # query plans, JIT, caches
        started = time.perf_counter()
        seconds = []
        block = 1000  # documents are built a block at a time (not timed): 100,000 graphs do not fit in memory
        for first in range(0, documents, block):
            seconds += _timed(store, [make_document(kb_id, d) for d in range(first, min(first + block, documents))])
        total = time.perf_counter() - started
        tenth = max(1, documents // 10)
        first_tenth, last_tenth = _ms(seconds[:tenth]), _ms(seconds[-tenth:])
        deciles = [round(statistics.median(seconds[i * tenth:(i + 1) * tenth]) * 1000, 3) for i in range(10)]

        revisited = list(range(0, documents, max(1, round(1 / REVISITED_SHARE))))
        re_extracted = _timed(store, [make_document(kb_id, d, version=2) for d in revisited])
        remaining = {d: (2 if d in set(revisited) else 1) for d in range(documents)}
        removed_seconds = []
        for d in revisited[: len(revisited) // 2]:
            started_removal = time.perf_counter()
            store.remove_document(kb_id, f"doc-{d:06d}")
            removed_seconds.append(time.perf_counter() - started_removal)
            del remaining[d]
        check = _check(store, kb_id, remaining)
    finally:
        if isinstance(store, Neo4jGraphStore):
            delete_kbs(store, [kb_id, warm_up_kb])
    return {
        "store": name,
        "documents": documents,
        "seconds": round(total, 1),
        "documents_per_s": round(documents / total, 1),
        "per_document_ms": {"first_10pct": first_tenth, "last_10pct": last_tenth, "all": _ms(seconds)},
        "median_ms_per_decile": deciles,
        "last_to_first_ratio": round(last_tenth["median"] / first_tenth["median"], 3),
        "last_to_first_ratio_of_means": round(last_tenth["mean"] / first_tenth["mean"], 3),
        "replace_at_full_degree_ms": _ms(re_extracted),
        "remove_at_full_degree_ms": _ms(removed_seconds) if removed_seconds else None,
        **check,
    }


def run(documents: int, stores: Sequence[str], output: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    for name in stores:
        if name == "neo4j":
            settings = load_settings()
            if not settings.neo4j_uri:
                raise SystemExit(
                    'LUMIKB_NEO4J_URI is not set: run `scripts/services up` and `eval "$(scripts/services env)"`'
                )
            password = settings.neo4j_password.get_secret_value() if settings.neo4j_password else ""
            store: GraphStore = Neo4jGraphStore(
                settings.neo4j_uri, settings.neo4j_user, password, database=settings.neo4j_database
            )
            store.ensure_schema()
            results[name] = run_store(name, store, documents)
        else:
            with tempfile.TemporaryDirectory(prefix="lumikb-hub-") as folder:
                store = EmbeddedGraphStore(Path(folder) / "graph.sqlite3")
                store.ensure_schema()
                results[name] = run_store(name, store, documents)
    result = {
        "benchmark": "hub_writes",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        },
        "config": {"documents": documents, "stores": list(stores), "flat_ratio_target": FLAT_RATIO},
        **results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Hub writes: {result['config']['documents']:,} documents naming one company, person and city")
    for column in ("store", "docs/s", "first 10% ms", "last 10% ms", "ratio", "replace ms", "remove ms", "records"):
        table.add_column(column, justify="right" if column != "store" else "left")
    for name in result["config"]["stores"]:
        row = result[name]
        per_doc = row["per_document_ms"]
        removal = row["remove_at_full_degree_ms"]
        table.add_row(
            name, f"{row['documents_per_s']:,.0f}", f"{per_doc['first_10pct']['median']:.2f}",
            f"{per_doc['last_10pct']['median']:.2f}", f"{row['last_to_first_ratio']:.2f}",
            f"{row['replace_at_full_degree_ms']['median']:.2f}", f"{removal['median']:.2f}" if removal else "-",
            f"{row['hub_pair_records']:,}",
        )
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hub_writes", description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=100_000, help="documents (default 100000)")
    parser.add_argument("--quick", action="store_true", help="1,000 documents")
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES), help="stores to run")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON result file (default {RESULTS})")
    args = parser.parse_args(argv)
    documents = 1000 if args.quick else args.documents
    if documents < 100:
        parser.error("--documents must be at least 100 (the figure compares the first and last 10%)")
    print_table(run(documents, args.stores, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
