"""The seed's plain Celery design, for the side-by-side comparison of issue 13 (point 3): one Celery
task per batch of documents, each document's chunks extracted one at a time with a blocking LiteLLM
call, the document's graph written, and Celery's per-worker `rate_limit` on the task as the only
limit. No Dagster, no shared limiter, no checkpoints, no ledger.

This module is both the Celery app its workers run and the driver that measures it:

    celery -A benchmarks.plain_design worker -Q lumikb_plain_design -c 1 -n plain-1@%h

`measure_plain_design` starts the workers, sends one task per batch, waits for the last document
(or for `max_seconds` from the first call) and counts the calls at the fake LLM server, the same way
as the stack's measurement (`lumikb_pipeline_tests/dagster/saturation.py`). `benchmarks.reextraction_saturation`
(`--plain-seconds`) runs it beside the stack on the same stack's services, documents and worker count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, signals

QUEUE = "lumikb_plain_design"
DONE_KEY = "lumikb:plain_design:done"
REPO = Path(__file__).resolve().parents[1]
FIRST_CALL_TIMEOUT_S = 120

app = Celery("plain_design", broker=os.environ.get("LUMIKB_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_default_queue=QUEUE, worker_prefetch_multiplier=1, task_acks_late=True,
                worker_hijack_root_logger=False)


@signals.worker_init.connect
def _import_before_ready(**_: Any) -> None:
    """Import what a task uses before the worker says it is ready (the pool's processes fork after
    this), so the measured seconds are the design's, not LiteLLM's import on a first task."""
    import litellm  # noqa: F401

    import lumikb_pipeline.graph  # noqa: F401
    import lumikb_pipeline.pipeline.work  # noqa: F401


@app.task(name="plain_design.extract_batch", rate_limit=os.environ.get("PLAIN_DESIGN_TASK_RATE", "10/s"))
def extract_batch(doc_ids: list[str], schema_version: int) -> int:
    """Extract and write a batch of documents, chunk after chunk, as the seed did."""
    import litellm
    import redis

    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.domain.modes import WriteMode
    from lumikb_pipeline.domain.results import ChunkExtraction, GraphChunk
    from lumikb_pipeline.graph import open_graph_store
    from lumikb_pipeline.graph.build import build_document_graph
    from lumikb_pipeline.llm.client import format_kwargs
    from lumikb_pipeline.llm.parse import parse_answer
    from lumikb_pipeline.llm.prompt import build_messages
    from lumikb_pipeline.pipeline.work import load_work

    settings = get_settings()
    api_key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
    store = open_graph_store(settings)
    done = redis.Redis.from_url(settings.redis_url)
    try:
        for item in load_work(settings, doc_ids, schema_version).values():
            extractions = []
            for chunk in item.chunks:
                response = litellm.completion(
                    model=settings.llm_model, messages=build_messages(item.schema, chunk.text),
                    api_base=settings.llm_api_base, api_key=api_key, timeout=settings.llm_timeout_s,
                    temperature=0, num_retries=3, drop_params=True, **format_kwargs(settings.llm_model, item.schema),
                )
                choice = response.choices[0]
                parsed = parse_answer(choice.message.content, item.schema, choice.finish_reason)
                extractions.append(ChunkExtraction(chunk_id=chunk.id, entities=parsed.entities,
                                                   relationships=parsed.relationships, llm_calls=1))
            chunks = [GraphChunk(id=c.id, ordinal=item.ordinals[c.id]) for c in item.chunks]
            graph = build_document_graph(item.kb_slug, item.doc_id, item.schema_version, chunks, extractions)
            store.write_document(graph, item.schema, WriteMode.REPLACE)
            done.incr(DONE_KEY)
    finally:
        store.close()
        done.close()
    return len(doc_ids)


@dataclass
class PlainRun:
    documents: int
    seconds: float
    arrivals: list[float]  # calls at the server, seconds from the first task sent
    finished: bool  # every document done (else stopped at `max_seconds`)


def measure_plain_design(
    env: dict[str, str], doc_ids: Sequence[str], schema_version: int, *, workers: int, batch_size: int,
    limit_per_s: float, calls: Any, reset_calls: Any, logs: Path, max_seconds: float,
) -> PlainRun:
    """Run the plain design over `doc_ids` with `workers` worker processes (one Celery worker of
    concurrency 1 each, Celery's `rate_limit` at the limit's share per worker). `calls()` returns the
    server's calls, `reset_calls()` clears them."""
    import redis

    broker = redis.Redis.from_url(env["LUMIKB_REDIS_URL"])
    broker.delete(DONE_KEY, QUEUE)
    worker_env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
                  "PLAIN_DESIGN_TASK_RATE": f"{limit_per_s / workers:g}/s"}
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for n in range(workers):
        log = (logs / f"plain-{n}.log").open("wb")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.plain_design", "worker", "-Q", QUEUE, "-c", "1",
             "-n", f"plain-{n}@%h", "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "INFO"],
            cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    try:
        deadline = time.monotonic() + 120
        while not all((logs / f"plain-{n}.log").read_text(errors="replace").count("ready.") for n in range(workers)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"the plain-design workers did not start; see {logs}")
            time.sleep(0.5)
        reset_calls()
        started = time.time()
        for first in range(0, len(doc_ids), batch_size):
            extract_batch.apply_async((list(doc_ids[first:first + batch_size]), schema_version), queue=QUEUE)
        finished = False
        first_call = None  # `max_seconds` counts from the first call at the server, not from the tasks sent
        while first_call is None or time.time() - first_call < max_seconds:
            if int(broker.get(DONE_KEY) or 0) >= len(doc_ids):
                finished = True
                break
            if first_call is None and (arrived := [call["arrived"] for call in calls()]):
                first_call = min(arrived)
            if first_call is None and time.time() - started > FIRST_CALL_TIMEOUT_S:
                raise RuntimeError(f"the plain design made no LLM call within {FIRST_CALL_TIMEOUT_S} s; see {logs}")
            time.sleep(0.5)
        seconds = time.time() - started
        arrivals = sorted(call["arrived"] - started for call in calls())
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
        broker.delete(DONE_KEY, QUEUE)
        broker.close()
    return PlainRun(len(doc_ids), seconds, arrivals, finished)
