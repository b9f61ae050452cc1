"""What Dagster and Celery cost per document (issue 13, point 4): the issue's re-extraction job
(1,000 documents × 5 chunks) with the offline model (no LLM wait, so what is left is orchestration
and the work itself) through the whole stack, and through the processing functions called in this
process, side by side in one run.

    eval "$(scripts/services env)"
    python -m benchmarks.orchestration_overhead            # 1,000 documents × 5 chunks, 3 rounds
    python -m benchmarks.orchestration_overhead --quick    # 40 documents, 1 round
    python -m benchmarks.orchestration_overhead --documents 400 --chunks 3 --batch-size 40

One stack of real processes (`lumikb_pipeline_tests/dagster/stack.py`: Dagster code server,
webserver and daemon, Celery workers with two `reprocessing` processes, PostgreSQL, Redis, Neo4j)
with `LUMIKB_LLM_MODEL=lumikb/offline`. Each round ingests two KBs of the same documents as
extracted at schema version 1:
- **stack**: the first KB's schema changes; the schema-version sensor starts the job (a backfill of
  batch runs on `reprocessing`); timed from the schema change to the job's end.
- **in-process**: the second KB, in an app database of its own that the stack's sensors do not
  read (so no sensor starts a job for it), has its schema changed and its documents go through
  `pipeline.extract.extract_documents` and `pipeline.write.write_documents` here, batch by batch
  (the batch size of the stack's runs), one process, while the stack stays up as it was.

The runs hold `LUMIKB_REEXTRACT_BATCH_SIZE` documents each, the product's default unless
`--batch-size` says otherwise: each run is a process of Dagster's own, so the batch size is what
spreads it.

The overhead per document is (stack seconds − in-process seconds) / documents, per round; the
figure is its median (target < 50 ms). Three rounds by default: the job's start waits for Dagster's
backfill daemon, whose fixed 30-s loop is in any phase against the schema change, so a round's
figure alone varies by up to 30 ms a document at 1,000 documents. The daemon runs through every
round (restarting it would put each later round's schema change at the same phase of that loop).
The stack runs two processes where in-process runs one, so a negative figure means the stack's
parallelism outweighs what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path("benchmarks/results/orchestration_overhead.json")


def _default_batch_size() -> int:
    from lumikb_pipeline.core.config import Settings

    return int(Settings.model_fields["reextract_batch_size"].default)


def _stack_round(stack: Any, root: Path, documents: int, chunks: int) -> float:
    from sqlalchemy import select

    from lumikb_pipeline.db.models import Job, JobStatus
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline_tests.dagster.helpers import SCHEMA_V2, create_kb, database_url, set_schema, unique_slug
    from lumikb_pipeline_tests.dagster.saturation import ingest_as_extracted
    from lumikb_pipeline_tests.dagster.stack import wait_until

    slug = unique_slug("overhead")
    create_kb(slug)
    ingest_as_extracted(slug, root / slug, documents, chunks)
    started = time.monotonic()
    set_schema(slug, SCHEMA_V2)

    def ended() -> Job | None:
        with session_scope(database_url()) as session:
            job = session.scalar(select(Job).where(Job.dedupe_key == f"sensor:{slug}:2"))
            if job is None or job.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
                return None
            session.expunge(job)
            return job

    job = wait_until(ended, 1800, 0.2, f"the re-extraction job of {slug}")
    seconds = time.monotonic() - started
    if job.status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {job.status.value}")
    return seconds


@contextmanager
def _own_app_database() -> Iterator[None]:
    """Inside the block, this process's app database is a new one that the stack's sensors do not
    read (its documents start no job there); dropped afterwards, its KBs' graphs too."""
    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.db import migrate
    from lumikb_pipeline_tests.conftest import create_postgres_database, drop_postgres_database

    url = create_postgres_database("overhead_inproc")
    saved = os.environ["LUMIKB_DATABASE_URL"]
    try:
        migrate.upgrade(url)
        os.environ["LUMIKB_DATABASE_URL"] = url
        get_settings.cache_clear()
        yield
    finally:
        os.environ["LUMIKB_DATABASE_URL"] = saved
        get_settings.cache_clear()
        drop_postgres_database(url)  # its KBs' graphs, then this process's pooled connections, first


def _in_process_round(stack: Any, root: Path, documents: int, chunks: int, batch_size: int) -> float:
    from lumikb_pipeline.core.config import load_settings
    from lumikb_pipeline.db import ledger
    from lumikb_pipeline.db.models import ExtractionStatus
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.graph import open_graph_store
    from lumikb_pipeline.llm.extractor import ChunkExtractor
    from lumikb_pipeline.pipeline.extract import extract_documents
    from lumikb_pipeline.pipeline.write import write_documents
    from lumikb_pipeline_tests.dagster.helpers import SCHEMA_V2, create_kb, database_url, set_schema, unique_slug
    from lumikb_pipeline_tests.dagster.saturation import ingest_as_extracted

    slug = unique_slug("inproc")
    create_kb(slug)
    ids = ingest_as_extracted(slug, root / slug, documents, chunks)
    settings = load_settings()
    store = open_graph_store(settings)
    extractor = ChunkExtractor(settings)
    extractor.warm_up()
    try:
        started = time.monotonic()
        version = set_schema(slug, SCHEMA_V2)
        for first in range(0, len(ids), batch_size):
            batch = ids[first:first + batch_size]
            outcomes = extract_documents(settings, extractor, batch, claimant="bench-in-process",
                                         schema_version=version)
            write_documents(settings, store, outcomes, claimant="bench-in-process")
        seconds = time.monotonic() - started
    finally:
        store.close()
    with session_scope(database_url()) as session:
        done = len([r for r in ledger.records_for(session, ids, version).values()
                    if r.status == ExtractionStatus.SUCCEEDED])
    if done != len(ids):
        raise RuntimeError(f"in-process: {done} of {len(ids)} documents succeeded")
    return seconds


def measure(documents: int, chunks: int, rounds: int, batch_size: int) -> dict[str, Any]:
    from lumikb_pipeline.db.session import dispose_engines
    from lumikb_pipeline_tests.dagster.stack import stack_environment, start_stack, stop_stack

    root = Path(tempfile.mkdtemp(prefix="lumikb-overhead-"))
    overrides = {"LUMIKB_LLM_MODEL": "lumikb/offline", "LUMIKB_REEXTRACT_BATCH_SIZE": str(batch_size)}
    stack = start_stack(root / "stack", overrides)
    results = []
    try:
        with stack_environment(stack):
            for _ in range(rounds):
                stack_s = _stack_round(stack, root, documents, chunks)
                with _own_app_database():
                    in_process_s = _in_process_round(stack, root, documents, chunks, batch_size)
                results.append({
                    "stack_s": round(stack_s, 2), "in_process_s": round(in_process_s, 2),
                    "stack_documents_per_s": round(documents / stack_s, 2),
                    "in_process_documents_per_s": round(documents / in_process_s, 2),
                    "overhead_ms_per_document": round((stack_s - in_process_s) / documents * 1000, 1),
                })
                print(f"round {len(results)}: {results[-1]}", flush=True)
    finally:
        dispose_engines()
        stop_stack(stack)
    overheads = [r["overhead_ms_per_document"] for r in results]
    return {
        "documents": documents, "chunks_per_document": chunks, "rounds": results, "batch_size": batch_size,
        "overhead_ms_per_document": {"median": statistics.median(overheads), "min": min(overheads),
                                     "max": max(overheads)},
        "stack_documents_per_s": statistics.median(r["stack_documents_per_s"] for r in results),
        "in_process_documents_per_s": statistics.median(r["in_process_documents_per_s"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.orchestration_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 documents, 1 round")
    parser.add_argument("--documents", type=int, default=None)
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="documents per run (default: LUMIKB_REEXTRACT_BATCH_SIZE's default)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    from lumikb_pipeline_tests.dagster.stack import services_unset

    if unset := services_unset():
        print(unset, file=sys.stderr)
        return 2
    documents = args.documents or (40 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)
    result = measure(documents, args.chunks, rounds, args.batch_size or _default_batch_size())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    overhead = result["overhead_ms_per_document"]
    print(f"\nOrchestration overhead, offline model, {documents} documents × {args.chunks} chunks, runs of "
          f"{result['batch_size']}, {rounds} round(s):")
    print(f"  through the stack: {result['stack_documents_per_s']:.1f} documents/s; in-process: "
          f"{result['in_process_documents_per_s']:.1f} documents/s")
    print(f"  overhead per document (median): {overhead['median']:.1f} ms (min {overhead['min']:.1f}, "
          f"max {overhead['max']:.1f}); target < 50 ms")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
