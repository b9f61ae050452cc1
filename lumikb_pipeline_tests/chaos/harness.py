"""The chaos suite's harness: a re-extraction of 60 three-chunk documents on the `lumikb up` stack,
one fault injected while it is well under way, then only waiting; and what is measured and asserted
afterwards (issue 12).

A scenario's KB is made at schema v1 with its documents recorded as extracted (no LLM call), then
moved to v2: the schema sensor starts the re-extraction job, as in production. Every scenario uses
the same document texts, so its graph, its calls and its time compare with the clean run's.

LLM calls are counted at the fake server: `billed` are the calls it answered 200 (a provider bills
those; its 429s and 5xx cost nothing). `in flight at the fault` are the chunks whose call had been
sent when the fault began and whose result was not stored yet (its chunk checkpoint was made after
the fault, by whoever redid it): their answers may be lost with the process that waited, including
an answer that had left the server but was not yet checkpointed by the worker. A call counts as
sent before the fault when it reached the server by then, or up to `SEND_LAG_S` later (a request
already on its way when its worker was killed) if its answer was then never stored (the chunk's
checkpoint came more than `STORE_S` after it: the process that waited for it was gone).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import DagsterRunStatus, RunsFilter
from sqlalchemy import func, select

from lumikb_pipeline_tests.dagster.helpers import (
    SCHEMA_V1,
    SCHEMA_V2,
    create_kb,
    database_url,
    failed_runs_report,
    ingest_as_extracted,
    set_schema,
    unique_slug,
)
from lumikb_pipeline_tests.dagster.stack import Stack, wait_until

# The stack's settings for this suite: a rate that makes the clean run last about a minute (so a
# fault lands in the middle of it), batches of 20 documents (3 runs, 2 at a time), and the
# production retry budget of an LLM call (attempts, and the outage window the other end-to-end
# tests turn off).
CHAOS_ENV = {
    "LUMIKB_LLM_RATE_LIMIT": "10/s",
    "LUMIKB_LLM_MAX_ATTEMPTS": "6",
    "LUMIKB_LLM_RETRY_WINDOW_S": "600",
    "LUMIKB_REEXTRACT_BATCH_SIZE": "20",
}
DOCUMENTS = 60
CHUNKS_PER_DOCUMENT = 3
UNDER_WAY_SHARE = 0.35  # the fault comes once this share of the chunks has been answered
SEND_LAG_S = 0.5
STORE_S = 2.0
RESUME_BOUND_S = 120.0
FINISH_MARGIN_S = 300.0
CLEAN_TIMEOUT_S = 600.0

FILLER = "The quarterly review was read aloud to the board, which approved it without further comment. "

# Scenario name -> what it measured; printed and written to JSON at the end of the session.
RESULTS: dict[str, dict[str, Any]] = {}


def document_text(i: int) -> str:
    """A document of three chunks, each naming its own organisation, person and place."""
    parts = []
    for p in range(CHUNKS_PER_DOCUMENT):
        n = f"{i}p{p}"
        parts.append(
            f"Firm{n} Corporation employs Ann{n} Berg. Firm{n} Corporation is located in Town{(i + p) % 13}. "
            + FILLER * 14
        )
    return "\n\n".join(parts) + "\n"


@dataclass(frozen=True)
class FaultWindow:
    """When a fault began and when it ended (the restart, or the service answering again), as `time.time()`."""

    what: str
    started: float
    ended: float


@dataclass
class Running:
    """A re-extraction under way, for a fault to act on."""

    slug: str
    job_id: str
    calls_before: int


Fault = Callable[[Stack, Running], FaultWindow]


@dataclass
class Measured:
    """What one re-extraction did."""

    name: str
    slug: str
    job_id: str
    doc_ids: list[str]
    started: float
    finished: float | None
    status: str
    calls: list[dict[str, Any]]
    graph: Any
    checkpointed: dict[str, float]  # chunk (the fake server's `chunk`: its content hash's first 16) -> when stored
    window: FaultWindow | None = None
    leftovers: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def billed(self) -> int:
        return sum(1 for call in self.calls if call["status"] == 200)

    def in_flight_at_fault(self) -> int:
        """Chunks whose call had been sent at the fault's start and whose result was not stored then."""
        if self.window is None:
            return 0
        at = self.window.started

        def in_flight(call: dict[str, Any]) -> bool:
            stored = self.checkpointed.get(call["chunk"], float("inf"))
            if not call["chunk"] or stored <= at:
                return False
            if call["arrived"] <= at:
                return True
            lost = call["answered"] is None or stored > call["answered"] + STORE_S
            return call["arrived"] <= at + SEND_LAG_S and lost

        return len({call["chunk"] for call in self.calls if in_flight(call)})

    def paid_twice(self, limit: int = 5) -> list[dict[str, Any]]:
        """A few chunks billed more than once: each call's arrival and answer and the chunk's
        checkpoint, in seconds from the fault's start (what a failed assertion shows)."""
        at = self.window.started if self.window else self.started
        billed: dict[str, list[dict[str, Any]]] = {}
        for call in self.calls:
            if call["status"] == 200 and call["chunk"]:
                billed.setdefault(call["chunk"], []).append(call)

        def since(t: float | None) -> float | None:
            return None if t is None else round(t - at, 1)

        return [
            {"chunk": chunk, "calls": [(since(c["arrived"]), since(c["answered"])) for c in calls],
             "stored": since(self.checkpointed.get(chunk))}
            for chunk, calls in billed.items() if len(calls) > 1
        ][:limit]

    def resumed_after_s(self) -> float | None:
        """Seconds from the fault's end to the next call the LLM answered; 0 when the calls did not
        stop for the fault (Neo4j away, say): every chunk answered by its end, some during it.
        None: the calls stopped and never came back."""
        if self.window is None:
            return None
        answered = [c for c in self.calls if c["status"] == 200]
        after = [c["arrived"] for c in answered if c["arrived"] >= self.window.ended]
        if after:
            return min(after) - self.window.ended
        during = any(self.window.started <= c["arrived"] < self.window.ended for c in answered)
        every_chunk = len({c["chunk"] for c in answered}) >= len(self.doc_ids) * CHUNKS_PER_DOCUMENT
        return 0.0 if during and every_chunk else None


def _job(slug: str) -> Any:
    from lumikb_pipeline.db.models import Job
    from lumikb_pipeline.db.session import session_scope

    with session_scope(database_url()) as session:
        job = session.scalar(select(Job).where(Job.dedupe_key == f"sensor:{slug}:2"))
        if job is None or not job.dagster_backfill_id:
            return None
        session.expunge(job)
        return job


def checkpoint_times(slug: str, version: int = 2) -> dict[str, float]:
    """When each chunk of the KB got its checkpoint at `version`, by the first 16 hex digits of its
    content hash (what the fake server records as a call's `chunk`)."""
    from lumikb_pipeline.db.models import ChunkCheckpoint, KnowledgeBase
    from lumikb_pipeline.db.session import session_scope

    with session_scope(database_url()) as session:
        rows = session.execute(
            select(ChunkCheckpoint.chunk_hash, ChunkCheckpoint.created_at)
            .join(KnowledgeBase, KnowledgeBase.id == ChunkCheckpoint.kb_id)
            .where(KnowledgeBase.slug == slug, ChunkCheckpoint.schema_version == version)
        ).tuples()
        return {chunk_hash[:16]: created.timestamp() for chunk_hash, created in rows}


def _billed_since(stack: Stack, index: int) -> int:
    return sum(1 for call in stack.llm_calls()[index:] if call["status"] == 200)


def leftovers(stack: Stack) -> list[str]:
    """Whatever is still held or going on the whole stack: unfinished runs, claimed pool slots,
    ledger rows `running`, jobs pending or running. Empty when everything has ended."""
    from lumikb_pipeline.core.names import POOL_GRAPH_WRITE, POOL_LLM
    from lumikb_pipeline.db.models import ExtractionRecord, ExtractionStatus, Job, JobStatus
    from lumikb_pipeline.db.session import session_scope

    found = []
    with stack.instance() as instance:
        unfinished = instance.get_runs(RunsFilter(statuses=[
            DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING,
        ]))
        found += [f"run {run.run_id} {run.status.value}" for run in unfinished]
        for pool in (POOL_LLM, POOL_GRAPH_WRITE):
            claimed = instance.event_log_storage.get_concurrency_info(pool).claimed_slots
            found += [f"pool {pool}: slot held by run {slot.run_id} step {slot.step_key}" for slot in claimed]
    with session_scope(database_url()) as session:
        running = session.scalar(select(func.count()).select_from(ExtractionRecord).where(
            ExtractionRecord.status == ExtractionStatus.RUNNING))
        if running:
            found.append(f"{running} ledger row(s) running")
        active = session.scalars(select(Job.id).where(Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING])))
        found += [f"job {job_id} still active" for job_id in active]
    return found


def canonical_graph(slug: str) -> Any:
    """The KB's graph (entities, relationships, provenance) with the KB's name and its documents' ids
    replaced by the documents' file names, so the graphs of two KBs of the same files compare equal."""
    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.db.models import Chunk, Document, KnowledgeBase
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.graph import open_graph_store

    with session_scope(database_url()) as session:
        documents = session.execute(
            select(Document.id, Document.source).join(KnowledgeBase, KnowledgeBase.id == Document.kb_id)
            .where(KnowledgeBase.slug == slug)
        ).tuples().all()
        names = {doc_id: Path(source).name for doc_id, source in documents}
        chunks = session.execute(
            select(Chunk.id, Chunk.document_id, Chunk.ordinal).where(Chunk.document_id.in_(list(names)))
        ).tuples().all()
        names.update({chunk_id: f"{names[doc_id]}#{ordinal}" for chunk_id, doc_id, ordinal in chunks})
    store = open_graph_store(get_settings())
    try:
        text = json.dumps(store.dump(slug).model_dump(), sort_keys=True)
    finally:
        store.close()
    text = text.replace(slug, "<kb>")
    for identifier, name in names.items():
        text = text.replace(identifier, name)
    dump = json.loads(text)
    return {key: sorted(json.dumps(item, sort_keys=True) for item in items) for key, items in dump.items()}


def run_reextraction(stack: Stack, folder: Path, name: str, fault: Fault | None,
                     clean: Measured | None = None) -> Measured:
    """Start a re-extraction of `DOCUMENTS` documents, inject `fault` once it is well under way, and
    wait (only wait) until the job ends, up to the clean run's time plus `FINISH_MARGIN_S`, and then
    until nothing is held any more."""
    slug = unique_slug(f"chaos-{name}")
    create_kb(slug, SCHEMA_V1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(DOCUMENTS):
        path = folder / f"doc-{i:03d}.txt"
        path.write_text(document_text(i))
        paths.append(path)
    doc_ids = ingest_as_extracted(slug, paths)
    calls_before = len(stack.llm_calls())
    started = time.time()
    assert set_schema(slug, SCHEMA_V2) == 2
    job = wait_until(lambda: _job(slug), 60, 1, "the schema sensor's re-extraction job")
    window = None
    if fault is not None:
        chunks = DOCUMENTS * CHUNKS_PER_DOCUMENT
        wait_until(lambda: _billed_since(stack, calls_before) >= UNDER_WAY_SHARE * chunks, 300, 0.5,
                   f"{UNDER_WAY_SHARE:.0%} of the chunks extracted")
        window = fault(stack, Running(slug, job.id, calls_before))
        _say(f"{name}: {window.what}; fault from +{window.started - started:.1f}s to +{window.ended - started:.1f}s")
    limit = (clean.duration_s + FINISH_MARGIN_S) if clean is not None else CLEAN_TIMEOUT_S
    deadline = started + limit
    finished: float | None = None
    status = job.status.value
    while time.time() < deadline:
        current = _job(slug)
        status = current.status.value
        if status == "succeeded":
            finished = current.finished_at.timestamp() if current.finished_at else time.time()
            break
        time.sleep(2)
    left = leftovers(stack)
    quiet_deadline = time.time() + 120
    while left and time.time() < quiet_deadline:
        time.sleep(3)
        left = leftovers(stack)
    measured = Measured(
        name=name, slug=slug, job_id=job.id, doc_ids=doc_ids, started=started, finished=finished, status=status,
        calls=stack.llm_calls()[calls_before:], graph=canonical_graph(slug), checkpointed=checkpoint_times(slug),
        window=window, leftovers=left,
    )
    if status != "succeeded" or left:
        with stack.instance() as instance:
            runs = instance.get_runs(RunsFilter(tags={"lumikb/job_id": job.id}))
            _say(f"{name}: job {status} after {measured.duration_s:.0f}s; left: {left}\n"
                 + failed_runs_report(instance, runs))
    else:
        _say(f"{name}: job succeeded in {measured.duration_s:.1f}s, {measured.billed} billed call(s) "
             f"of {len(measured.calls)}")
    return measured


def ledger_by_document(doc_ids: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Every ledger row of the documents: (schema version, status) per document."""
    from lumikb_pipeline.db.models import ExtractionRecord
    from lumikb_pipeline.db.session import session_scope

    rows: dict[str, list[tuple[int, str]]] = {doc_id: [] for doc_id in doc_ids}
    with session_scope(database_url()) as session:
        for doc_id, version, status in session.execute(
            select(ExtractionRecord.document_id, ExtractionRecord.schema_version, ExtractionRecord.status)
            .where(ExtractionRecord.document_id.in_(doc_ids))
        ).tuples():
            rows[doc_id].append((version, status.value))
    return rows


def record(run: Measured, clean: Measured) -> dict[str, Any]:
    """What a scenario measured, kept for the table at the end."""
    resumed = run.resumed_after_s()
    row = {
        "scenario": run.name,
        "fault": run.window.what if run.window else "",
        "status": run.status,
        "resumed_after_s": round(resumed, 1) if resumed is not None else None,
        "finished_s": round(run.duration_s, 1),
        "clean_s": round(clean.duration_s, 1),
        "extra_s": round(run.duration_s - clean.duration_s, 1),
        "billed_calls": run.billed,
        "clean_billed_calls": clean.billed,
        "extra_billed_calls": run.billed - clean.billed,
        "in_flight_at_fault": run.in_flight_at_fault(),
        "refused_calls": sum(1 for c in run.calls if c["status"] != 200),
    }
    RESULTS[run.name] = row
    return row


def assert_recovered(stack: Stack, run: Measured, clean: Measured) -> None:
    """Every assertion of issue 12, against the clean run."""
    row = record(run, clean)
    _say(f"{run.name}: {json.dumps(row)}")
    assert run.status == "succeeded", (
        f"job {run.job_id} is {run.status} {run.duration_s:.0f}s after it started (clean: {clean.duration_s:.0f}s)"
    )
    assert run.duration_s <= clean.duration_s + FINISH_MARGIN_S
    assert not run.leftovers, run.leftovers
    resumed = run.resumed_after_s()
    assert resumed is not None and resumed <= RESUME_BOUND_S, f"LLM calls resumed after {resumed}s"
    assert run.graph == clean.graph, f"the graph differs from the clean run's: {graph_difference(run, clean)}"
    rows = ledger_by_document(run.doc_ids)
    wrong = {doc_id: r for doc_id, r in rows.items() if sorted(r) != [(1, "succeeded"), (2, "succeeded")]}
    assert not wrong, f"{len(wrong)} document(s) without exactly one succeeded row at v2: {list(wrong.items())[:5]}"
    assert run.billed <= clean.billed + run.in_flight_at_fault(), {**row, "paid twice": run.paid_twice()}
    shown = stack.lumikb("progress", run.job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    progress = json.loads(shown.stdout)
    assert (progress["status"], progress["total"], progress["completed"], progress["failed"],
            progress["cancelled"], progress["remaining"]) == ("succeeded", DOCUMENTS, DOCUMENTS, 0, 0, 0), progress


def graph_difference(run: Measured, clean: Measured, limit: int = 3) -> dict[str, Any]:
    """A few items of each part of the graph that only one of the two runs has."""
    difference = {}
    for part in sorted(set(run.graph) | set(clean.graph)):
        mine, theirs = set(run.graph.get(part, [])), set(clean.graph.get(part, []))
        if mine != theirs:
            difference[part] = {"only here": sorted(mine - theirs)[:limit], "only clean": sorted(theirs - mine)[:limit]}
    return difference


def write_results(path: Path) -> None:
    path.write_text(json.dumps(RESULTS, indent=2))


def results_table() -> str:
    header = ("scenario", "resumed after s", "finished s", "clean s", "extra s", "billed calls", "extra calls",
              "in flight", "refused")
    lines = ["  ".join(f"{h:>15}" for h in header)]
    for row in RESULTS.values():
        values = (row["scenario"], row["resumed_after_s"], row["finished_s"], row["clean_s"], row["extra_s"],
                  row["billed_calls"], row["extra_billed_calls"], row["in_flight_at_fault"], row["refused_calls"])
        lines.append("  ".join(f"{'-' if v is None else v!s:>15}" for v in values))
    return "\n".join(lines)


def active_extract_steps(stack: Stack, queue: str = "reprocessing") -> list[int]:
    """The pids of the Celery worker processes of `queue` running an extract step now."""
    from celery import Celery

    app = Celery(broker=stack.env["CELERY_BROKER_URL"])
    try:
        replies = app.control.inspect(destination=[f"{queue}@{socket.gethostname()}"], timeout=3).active() or {}
    finally:
        app.close()
    return [
        int(task["worker_pid"]) for tasks in replies.values() for task in tasks
        if "extract_document_entities" in json.dumps(task.get("kwargs"), default=str) and task.get("worker_pid")
    ]


def _say(message: str) -> None:
    print(f"\n[chaos] {message}", flush=True)
