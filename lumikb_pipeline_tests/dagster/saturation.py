"""A re-extraction through the whole stack, measured at the fake LLM server: documents of several
chunks are ingested as extracted, the schema changes, the schema-version sensor starts the job (a
backfill on `reprocessing`), and once the job has ended the calls' arrival times say how much of
the rate limit it used. The Dagster event log gives each run's timeline (queued, started, its
steps, ended), which shows where the calls stopped.

Used by the saturation test (`test_reextraction_saturation.py`) and the benchmark
(`benchmarks/reextraction_saturation.py`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from lumikb_pipeline.testing.call_rates import SteadyWindows, busiest_window, steady_windows, tightest_second
from lumikb_pipeline_tests.dagster.helpers import (
    EXTRACT_STEP,
    SCHEMA_V2,
    WRITE_STEP,
    create_kb,
    database_url,
    set_schema,
)
from lumikb_pipeline_tests.dagster.stack import Stack, wait_until

# What the stack runs with for these measurements: the limit, latencies that need many calls in
# flight (Little's law: 10/s × 1 s = 10), and the in-flight cap's default (5·R).
SATURATION_ENV = {
    "LUMIKB_LLM_RATE_LIMIT": "10/s",
    "LUMIKB_LLM_MAX_IN_FLIGHT": "50",
    # Small batches: a run's documents are few against the job's (the margin extraction ahead leaves
    # to the next runs is two batches).
    "LUMIKB_REEXTRACT_BATCH_SIZE": "10",
}
CHUNK_TOKENS = 60


def document_text(tag: str, i: int, chunks: int) -> str:
    """A document of `chunks` paragraphs, each its own chunk at `CHUNK_TOKENS`."""
    return "\n\n".join(
        f"Firm{tag}x{i}p{p} Corporation employs Ann{tag}x{i}p{p} Berg. Firm{tag}x{i}p{p} Corporation is "
        f"located in Town{(i + p) % 13}."
        for p in range(chunks)
    ) + "\n"


def ingest_as_extracted(slug: str, folder: Path, documents: int, chunks: int) -> list[str]:
    """Write and ingest `documents` files of `chunks` chunks each, recorded as extracted at the KB's
    current version (so only the schema change makes them outdated); returns their ids."""
    from lumikb_pipeline.db import catalog, ledger
    from lumikb_pipeline.db.session import session_scope

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(documents):
        path = folder / f"{slug}-{i:05d}.txt"
        path.write_text(document_text(slug.replace("-", ""), i, chunks))
        paths.append(path)
    with session_scope(database_url()) as session:
        kb = catalog.get_kb(session, slug)
        ids = [catalog.ingest_file(session, kb, path, CHUNK_TOKENS)[1] for path in paths]
        ledger.ensure_records(session, kb.id, ids, kb.current_schema_version)
        for doc_id in ids:
            assert ledger.claim(session, doc_id, kb.current_schema_version, "test-seed")
            ledger.mark_succeeded(session, doc_id, kb.current_schema_version, "test-seed", ledger.Outcome())
    return ids


@dataclass
class RunTimeline:
    """One run of the job, in seconds from the job's start."""

    run_id: str
    created: float
    started: float | None
    ended: float | None
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)  # step key -> (start, end)


@dataclass
class Saturation:
    """What a re-extraction did with the limit."""

    documents: int
    chunks_per_document: int
    limit_per_s: float
    seconds: float  # from `lumikb reextract` to the job's end
    calls: int
    arrivals: list[float]
    windows: SteadyWindows
    busiest_1s: int
    busiest_1s_first_second: int
    runs: list[RunTimeline]
    origin: float  # the job's start on the server's clock (`windows` counts on that clock)

    def summary(self) -> dict[str, Any]:
        """The figures, and where the time between runs went (medians over the runs)."""

        def median(values: list[float]) -> float | None:
            return round(statistics.median(values), 2) if values else None

        extract = [r.steps[EXTRACT_STEP] for r in self.runs if EXTRACT_STEP in r.steps]
        write = [r.steps[WRITE_STEP] for r in self.runs if WRITE_STEP in r.steps]
        return {
            "documents": self.documents,
            "chunks_per_document": self.chunks_per_document,
            "limit_per_s": self.limit_per_s,
            "seconds": round(self.seconds, 1),
            "calls": self.calls,
            "share_of_limit_overall": round(self.calls / self.seconds / self.limit_per_s, 4) if self.seconds else 0,
            "steady_share_of_limit": round(self.windows.mean_share, 4),
            "lowest_10s_window_share": round(self.windows.lowest_share, 4),
            "calls_per_10s_window": list(self.windows.counts),
            "busiest_1s_window": self.busiest_1s,
            "busiest_1s_window_first_second": self.busiest_1s_first_second,
            # Under 1 s: some second held more calls than the limit; above it, the margin left.
            "tightest_span_of_limit_plus_one_s": tightest_second(self.arrivals, self.limit_per_s),
            # Where calls paused: the longest gaps between two calls (at, seconds), from the job's start.
            "longest_gaps_s": [(round(at, 1), round(gap, 2)) for gap, at in sorted(
                ((b - a, a) for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)), reverse=True)[:5]],
            "steady_part_s": (round(self.windows.start - self.origin, 1), round(self.windows.end - self.origin, 1)),
            "runs": len(self.runs),
            "median_s": {
                "queued_to_started": median([r.started - r.created for r in self.runs if r.started is not None]),
                "started_to_extract_start": median(
                    [r.steps[EXTRACT_STEP][0] - r.started for r in self.runs
                     if r.started is not None and EXTRACT_STEP in r.steps]),
                "extract": median([end - start for start, end in extract]),
                "extract_end_to_write_start": median(
                    [r.steps[WRITE_STEP][0] - r.steps[EXTRACT_STEP][1] for r in self.runs
                     if EXTRACT_STEP in r.steps and WRITE_STEP in r.steps]),
                "write": median([end - start for start, end in write]),
                "write_end_to_run_end": median(
                    [r.ended - r.steps[WRITE_STEP][1] for r in self.runs
                     if r.ended is not None and WRITE_STEP in r.steps]),
            },
        }


def run_timelines(instance: Any, backfill_id: str, origin: float) -> list[RunTimeline]:
    """Each run of a backfill: created, started, ended and its steps, from the event log."""
    from dagster import DagsterEventType, RunsFilter

    timelines = []
    for record in instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id})):
        run_id = record.dagster_run.run_id
        timeline = RunTimeline(
            run_id, record.create_timestamp.timestamp() - origin,
            record.start_time - origin if record.start_time else None,
            record.end_time - origin if record.end_time else None,
        )
        starts: dict[str, float] = {}
        kinds = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
        for event in instance.all_logs(run_id, of_type=kinds):
            if event.dagster_event_type == DagsterEventType.STEP_START:
                starts[event.step_key] = event.timestamp - origin
            elif event.step_key in starts:
                timeline.steps[event.step_key] = (starts[event.step_key], event.timestamp - origin)
        timelines.append(timeline)
    return sorted(timelines, key=lambda t: t.created)


def measure_reextraction(
    stack: Stack, slug: str, folder: Path, *, documents: int, chunks: int, latency_mean_s: float = 1.0,
    latency_jitter_s: float = 0.5, timeout_s: float = 1200,
) -> Saturation:
    """Ingest, change the schema (the schema-version sensor starts the job) and measure."""
    from lumikb_pipeline.core.config import parse_rate_limit
    from lumikb_pipeline.db.models import Job, JobStatus
    from lumikb_pipeline.db.session import session_scope

    limit = parse_rate_limit(stack.env["LUMIKB_LLM_RATE_LIMIT"]).per_second
    create_kb(slug)
    ingest_as_extracted(slug, folder, documents, chunks)
    latency = {"latency_mean_s": latency_mean_s, "latency_jitter_s": latency_jitter_s}
    httpx.post(f"{stack.llm_url}/_config", json=latency)
    httpx.post(f"{stack.llm_url}/_reset")
    started = time.time()
    # The schema change; the schema-version sensor starts the job (a backfill on `reprocessing`).
    set_schema(slug, SCHEMA_V2)

    def sensor_job() -> str | None:
        with session_scope(database_url()) as session:
            return session.scalar(select(Job.id).where(Job.dedupe_key == f"sensor:{slug}:2"))

    job_id = wait_until(sensor_job, 120, 0.5, "the schema-version sensor's job")

    def ended() -> Job | None:
        with session_scope(database_url()) as session:
            job = session.get_one(Job, job_id)
            session.expunge(job)
        return job if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED) else None

    job = wait_until(ended, timeout_s, 1, f"job {job_id} to end")
    seconds = time.time() - started
    assert job.status == JobStatus.SUCCEEDED, (job.status, job.id)
    arrivals = sorted(call["arrived"] for call in stack.llm_calls())
    with stack.instance() as instance:
        runs = run_timelines(instance, job.dagster_backfill_id or "", started)
    first = [t for t in arrivals if t < arrivals[0] + 1.0] if arrivals else []
    return Saturation(
        documents=documents, chunks_per_document=chunks, limit_per_s=limit, seconds=seconds, calls=len(arrivals),
        arrivals=[t - started for t in arrivals], windows=steady_windows(arrivals, limit),
        busiest_1s=busiest_window(arrivals), busiest_1s_first_second=len(first), runs=runs, origin=started,
    )


def overrides(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """`SATURATION_ENV` with `extra`; the in-flight cap follows the rate limit (the product's default, 5·R)
    unless `extra` sets it."""
    from lumikb_pipeline.core.config import parse_rate_limit

    env = {**SATURATION_ENV, **(extra or {})}
    if "LUMIKB_LLM_MAX_IN_FLIGHT" not in (extra or {}):
        env["LUMIKB_LLM_MAX_IN_FLIGHT"] = str(math.ceil(5 * parse_rate_limit(env["LUMIKB_LLM_RATE_LIMIT"]).per_second))
    return env


__all__ = ["SATURATION_ENV", "Saturation", "measure_reextraction", "overrides", "run_timelines"]
