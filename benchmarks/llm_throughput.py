"""LLM extraction throughput against a rate limit: our concurrent extractor vs the plain design.

    eval "$(scripts/services env)"            # the shared limiter lives in Redis (LUMIKB_REDIS_URL)
    python -m benchmarks.llm_throughput        # 400 chunks, latency 1 s ± 0.3 s, limit 10/s, 2 workers
    python -m benchmarks.llm_throughput --quick

Both designs run in the same run, against the same fake LLM server (a real HTTP server in its own
process), through LiteLLM and the same global Redis limiter, with two worker processes each:

- **ours**: each worker extracts its chunks concurrently (up to the in-flight cap), so calls that
  take a second each still fill every rate slot;
- **plain**: each worker extracts one chunk at a time (still through the limiter), so a worker
  makes at most one call per latency period.

The plain design is given a time budget (it would take minutes for 400 chunks) and measured on the
chunks it finished. Rates are measured at the server from the calls' arrival times. The table is
printed; the numbers go to `benchmarks/results/llm_throughput.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

SCHEMA = """
entity_types:
  - name: Organization
    description: A company, agency or institution.
  - name: Person
    description: A human being.
  - name: Location
    description: A city, country or other place.
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
    description: The organisation employs the person.
  - name: LOCATED_IN
    source: [Organization, Person]
    target: [Location]
    description: Based or located in the place.
"""

DEFAULT_OUTPUT = Path("benchmarks/results/llm_throughput.json")
# The limiter's ceiling is 95% of the limit (`rate_limit.DEFAULT_HEADROOM`, 5%); what stays under it
# is slots given up by late senders and the run's ramp at both ends.
TARGET_SHARE = 0.93


def chunk_text(design: str, i: int) -> str:
    return (f"Filing {design}-{i}. Acme Corp {i} hired Dr. Jane Doe {i} in Berlin. The Bank of Nordland, "
            f"based in Oslo, said Jane Doe {i} would join its board. Globex Ltd. moved to Paris.")


def _worker(settings_values: dict[str, Any], kb_id: int, design: str, indexes: list[int], concurrency: int,
            namespace: str, budget_s: float | None, ready: Any, go: Any, out: Any) -> None:
    """One worker process: extract its chunks with `concurrency` calls at once until done or out of time."""
    from lumikb_pipeline.core.config import Settings
    from lumikb_pipeline.domain.results import ChunkExtraction
    from lumikb_pipeline.domain.schema import parse_schema_text
    from lumikb_pipeline.llm.extractor import ChunkExtractor, ChunkInput

    extractor = ChunkExtractor(Settings(**settings_values), concurrency=concurrency,
                               limiter_options={"namespace": namespace})
    extractor.warm_up()
    chunks = [ChunkInput(id=f"{design}-{i}", text=chunk_text(design, i),
                         content_hash=hashlib.sha256(chunk_text(design, i).encode()).hexdigest()) for i in indexes]
    ready.set()
    go.wait()
    started = time.time()
    deadline = started + budget_s if budget_s is not None else None
    results = extractor.extract_sync(kb_id, 1, parse_schema_text(SCHEMA), chunks,
                                     should_stop=(lambda: time.time() >= deadline) if deadline else None)
    finished = time.time()
    done = [r for r in results if isinstance(r, ChunkExtraction)]
    cancelled = [r for r in results if not isinstance(r, ChunkExtraction) and r.reason == "cancelled"]
    out.put({"started": started, "finished": finished, "succeeded": len(done), "cancelled": len(cancelled),
             "failed": len(results) - len(done) - len(cancelled), "llm_calls": sum(r.llm_calls for r in results),
             "missed_slots": extractor.missed_slots})


def _control(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(url + path, data=json.dumps(body or {}).encode() if body is not None else None,
                                     method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def run_design(design: str, *, server_url: str, settings_values: dict[str, Any], kb_id: int, chunks: int,
               workers: int, concurrency: int, budget_s: float | None) -> dict[str, Any]:
    """Run one design with `workers` processes; return its measurements (from the server's record)."""
    from lumikb_pipeline.core.config import parse_rate_limit
    from lumikb_pipeline.testing.call_rates import busiest_window, tightest_second

    limit = parse_rate_limit(settings_values["llm_rate_limit"]).per_second
    _control(server_url, "/_reset", {})
    context = multiprocessing.get_context("forkserver")
    # Workers fork from a server that has imported LiteLLM once (seconds of CPU each otherwise).
    context.set_forkserver_preload(["lumikb_pipeline.llm.extractor"])
    go, out = context.Event(), context.Queue()
    readies = [context.Event() for _ in range(workers)]
    namespace = f"lumikb:bench:{uuid.uuid4().hex[:8]}"  # a fresh limiter: nothing left over from a last run
    processes = [
        context.Process(target=_worker, args=(settings_values, kb_id, design, list(range(w, chunks, workers)),
                                              concurrency, namespace, budget_s, readies[w], go, out))
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    for ready in readies:
        if not ready.wait(180):
            raise RuntimeError("a worker process did not start within 180 s")
    go.set()
    summaries = [out.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    calls = _control(server_url, "/_calls")["calls"]
    arrivals = sorted(c["arrived"] for c in calls)
    started, finished = min(s["started"] for s in summaries), max(s["finished"] for s in summaries)
    succeeded = sum(s["succeeded"] for s in summaries)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    return {
        "design": design,
        "concurrency_per_worker": concurrency,
        "chunks_succeeded": succeeded,
        "chunks_cancelled": sum(s["cancelled"] for s in summaries),  # left when the time budget ran out
        "chunks_failed": sum(s["failed"] for s in summaries),
        "llm_calls": len(calls),
        "elapsed_s": round(finished - started, 2),
        # Steady rate at the server: calls after the first over the time from first to last arrival.
        "calls_per_s": round((len(arrivals) - 1) / span, 3) if span else 0.0,
        "chunks_per_s": round(succeeded / (finished - started), 3),
        "busiest_1s_window": busiest_window(arrivals),
        # Under 1 s: some second held more calls than the limit; above it, the margin left.
        "tightest_span_of_limit_plus_one_s": tightest_second(arrivals, limit),
        "missed_slots": sum(s["missed_slots"] for s in summaries),
        "time_budget_s": budget_s,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both designs, print the table, write the JSON; exit 1 when ours misses its target share of the limit."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 chunks and a 15 s budget for the plain design")
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", default="10/s")
    parser.add_argument("--latency-mean", type=float, default=1.0)
    parser.add_argument("--latency-jitter", type=float, default=0.3)
    parser.add_argument("--plain-budget", type=float, default=None, help="seconds the plain design may run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    chunks = args.chunks or (100 if args.quick else 400)
    plain_budget = args.plain_budget or (15.0 if args.quick else 45.0)

    redis_url = os.environ.get("LUMIKB_REDIS_URL")
    if not redis_url:
        print('LUMIKB_REDIS_URL is not set: run `scripts/services up` and `eval "$(scripts/services env)"`',
              file=sys.stderr)
        return 2

    from lumikb_pipeline.core.config import parse_rate_limit
    from lumikb_pipeline.db.models import Base, KnowledgeBase
    from lumikb_pipeline.db.session import get_engine, session_scope
    from lumikb_pipeline.testing.fake_llm_server import raise_priority

    limit = parse_rate_limit(args.rate).per_second
    server = subprocess.Popen(
        [sys.executable, "-m", "lumikb_pipeline.testing.fake_llm_server", "--port", "0",
         "--latency-mean", str(args.latency_mean), "--latency-jitter", str(args.latency_jitter)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    raise_priority(server.pid)  # rates are measured at the server, from its arrival times
    try:
        assert server.stdout is not None
        server_url = server.stdout.readline().strip().removeprefix("listening on ")
        with tempfile.TemporaryDirectory() as folder:
            # Checkpoints go to a private SQLite file: a benchmark must not find results of the last run.
            database_url = f"sqlite:///{folder}/bench.sqlite3"
            Base.metadata.create_all(get_engine(database_url))
            kb_ids = {}
            with session_scope(database_url) as session:
                for design in ("ours", "plain"):
                    kb = KnowledgeBase(slug=f"bench-{design}", name=design)
                    session.add(kb)
                    session.flush()
                    kb_ids[design] = kb.id
            settings_values = {
                "llm_model": "openai/gpt-4o-mini", "llm_api_base": f"{server_url}/v1", "llm_api_key": "sk-bench",
                "llm_rate_limit": args.rate, "database_url": database_url, "redis_url": redis_url,
            }
            from lumikb_pipeline.core.config import Settings

            in_flight = Settings(**settings_values).max_in_flight
            ours = run_design("ours", server_url=server_url, settings_values=settings_values, kb_id=kb_ids["ours"],
                              chunks=chunks, workers=args.workers, concurrency=in_flight, budget_s=None)
            plain = run_design("plain", server_url=server_url, settings_values=settings_values,
                               kb_id=kb_ids["plain"], chunks=chunks, workers=args.workers, concurrency=1,
                               budget_s=plain_budget)
    finally:
        server.terminate()
        server.wait(timeout=10)

    result = {
        "benchmark": "llm_throughput",
        "chunks": chunks,
        "workers": args.workers,
        "rate_limit_per_s": limit,
        "latency_mean_s": args.latency_mean,
        "latency_jitter_s": args.latency_jitter,
        "ours": ours,
        "plain": plain,
        "ours_share_of_limit": round(ours["calls_per_s"] / limit, 4),
        "speedup_vs_plain": round(ours["chunks_per_s"] / plain["chunks_per_s"], 2) if plain["chunks_per_s"] else None,
        "target_share_of_limit": TARGET_SHARE,
    }
    result["target_met"] = result["ours_share_of_limit"] >= TARGET_SHARE and ours["busiest_1s_window"] <= limit
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    header = f"{'design':<8} {'chunks':>7} {'calls':>6} {'elapsed s':>10} {'calls/s':>8} {'chunks/s':>9} {'max/1s':>7}"
    print(f"\nLLM throughput: {chunks} chunks, {args.workers} workers, limit {args.rate}, "
          f"latency {args.latency_mean} s ± {args.latency_jitter} s")
    print(header)
    for row in (ours, plain):
        print(f"{row['design']:<8} {row['chunks_succeeded']:>7} {row['llm_calls']:>6} {row['elapsed_s']:>10} "
              f"{row['calls_per_s']:>8} {row['chunks_per_s']:>9} {row['busiest_1s_window']:>7}")
    print(f"ours uses {result['ours_share_of_limit']:.1%} of the limit (target {TARGET_SHARE:.0%}); "
          f"{result['speedup_vs_plain']}x the plain design's chunks/s")
    print(f"written to {args.output}")
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
