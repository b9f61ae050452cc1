"""Re-extraction through the whole stack against the rate limit (issue 13, point 1): how much of the
provider's limit a job uses from the schema change to its end, with and without extraction ahead.

    eval "$(scripts/services env)"
    python -m benchmarks.reextraction_saturation            # 300 documents × 3 chunks, limit 10/s, both
    python -m benchmarks.reextraction_saturation --quick    # 60 documents, extraction ahead only

Each configuration starts its own stack of real processes (the Dagster code server, webserver and
daemon, one Celery worker group per queue with two `reprocessing` processes, PostgreSQL, Redis,
Neo4j: `lumikb_pipeline_tests/dagster/stack.py`) and the fake LLM server with a latency of
1 s ± 0.5 s. The job's calls are counted at the server: the share of the limit over the steady part
(from the job's first to its last 10% of calls), the lowest 10-s window there, and the busiest 1-s
window anywhere (the first second included). "without ahead" is the design before issue 13
(`LUMIKB_REEXTRACT_AHEAD_S=0`): each run's step extracts its batch and ends. The JSON also holds
each run's timeline medians (queued → started → extract → write → ended), which show where calls
stopped.

"plain" is the seed's plain Celery design (`benchmarks/plain_design.py`: one Celery task per batch,
chunks one at a time, Celery's per-worker `rate_limit`), run after ours on the same stack's services,
over the same documents, with as many worker processes as the stack's `reprocessing` worker has
(two). It is stopped after `--plain-seconds` (its calls per second are what is compared, and at its
pace a whole job would take most of an hour); the ratio is ours over its share of the limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path("benchmarks/results/reextraction_saturation.json")


def measure(
    label: str, env: dict[str, str], documents: int, chunks: int, latency: tuple[float, float],
    plain_seconds: float = 0,
) -> dict[str, Any]:
    """Start a stack with `env`, re-extract, then (with `plain_seconds`) run the plain design over
    the same documents, stop the stack; the figures."""
    from lumikb_pipeline.db.session import dispose_engines
    from lumikb_pipeline_tests.dagster.saturation import measure_reextraction, overrides
    from lumikb_pipeline_tests.dagster.stack import stack_environment, start_stack, stop_stack, unique_slug

    root = Path(tempfile.mkdtemp(prefix=f"lumikb-saturation-{label}-"))
    stack = start_stack(root / "stack", overrides(env))
    try:
        with stack_environment(stack):
            started = time.monotonic()
            slug = unique_slug("bench")
            result = measure_reextraction(stack, slug, root / "docs", documents=documents, chunks=chunks,
                                          latency_mean_s=latency[0], latency_jitter_s=latency[1])
            summary = {"label": label, "env": env, **result.summary(),
                       "wall_s": round(time.monotonic() - started, 1),
                       # The raw timeline, to see where a window fell short (seconds from the job's start).
                       "arrivals_s": [round(t, 3) for t in result.arrivals],
                       "run_timelines": [dataclasses.asdict(run) for run in result.runs]}
            if plain_seconds:
                summary["plain"] = measure_plain(stack, slug, result.limit_per_s, plain_seconds,
                                                 root / "plain-logs", int(env["LUMIKB_REEXTRACT_BATCH_SIZE"]))
    finally:
        dispose_engines()
        stop_stack(stack)
    return summary


def measure_plain(
    stack: Any, slug: str, limit_per_s: float, max_seconds: float, logs: Path, batch_size: int
) -> dict[str, Any]:
    """The plain design over the KB's documents (at its current schema version) on `stack`'s services."""
    import httpx
    from sqlalchemy import select

    from benchmarks.plain_design import measure_plain_design
    from lumikb_pipeline.db.models import Document, KnowledgeBase
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.testing.call_rates import busiest_window, steady_windows, tightest_second

    with session_scope(stack.app_db_url) as session:
        kb = session.scalars(select(KnowledgeBase).where(KnowledgeBase.slug == slug)).one()
        version = kb.current_schema_version
        doc_ids = list(session.scalars(select(Document.id).where(Document.kb_id == kb.id).order_by(Document.id)))
    run = measure_plain_design(
        stack.env, doc_ids, version, workers=2, batch_size=batch_size,
        limit_per_s=limit_per_s, calls=stack.llm_calls, reset_calls=lambda: httpx.post(f"{stack.llm_url}/_reset"),
        logs=logs, max_seconds=max_seconds,
    )
    windows = steady_windows(run.arrivals, limit_per_s)
    return {
        "seconds": round(run.seconds, 1), "finished": run.finished, "calls": len(run.arrivals),
        "steady_share_of_limit": round(windows.mean_share, 4),
        "lowest_10s_window_share": round(windows.lowest_share, 4),
        "calls_per_10s_window": list(windows.counts), "busiest_1s_window": busiest_window(run.arrivals),
        "tightest_span_of_limit_plus_one_s": tightest_second(run.arrivals, limit_per_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reextraction_saturation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 documents, extraction ahead only")
    parser.add_argument("--documents", type=int, default=None)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=10, help="LUMIKB_REEXTRACT_BATCH_SIZE")
    parser.add_argument("--latency-mean", type=float, default=1.0)
    parser.add_argument("--latency-jitter", type=float, default=0.5)
    parser.add_argument("--without-ahead", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the design without extraction ahead (default: not with --quick)")
    parser.add_argument("--limit", default="10/s", help="LUMIKB_LLM_RATE_LIMIT of the stack")
    parser.add_argument("--plain-seconds", type=float, default=None,
                        help="run the plain Celery design this long after ours (default 300; 60 with --quick; 0: not)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    from lumikb_pipeline_tests.dagster.stack import services_unset

    if unset := services_unset():
        print(unset, file=sys.stderr)
        return 2
    documents = args.documents or (60 if args.quick else 300)
    without = (not args.quick) if args.without_ahead is None else args.without_ahead
    latency = (args.latency_mean, args.latency_jitter)
    base = {"LUMIKB_REEXTRACT_BATCH_SIZE": str(args.batch_size), "LUMIKB_LLM_RATE_LIMIT": args.limit}
    plain_seconds = args.plain_seconds if args.plain_seconds is not None else (60 if args.quick else 300)
    runs = [measure("with ahead", base, documents, args.chunks, latency, plain_seconds)]
    if without:
        before = {**base, "LUMIKB_REEXTRACT_AHEAD_S": "0"}
        runs.append(measure("without ahead", before, documents, args.chunks, latency))
    ours = runs[0]
    result = {
        "documents": documents, "chunks_per_document": args.chunks, "limit_per_s": ours["limit_per_s"],
        "latency_s": {"mean": args.latency_mean, "jitter": args.latency_jitter}, "batch_size": args.batch_size,
        "steady_share_of_limit": ours["steady_share_of_limit"],
        "lowest_10s_window_share": ours["lowest_10s_window_share"],
        "busiest_1s_window": ours["busiest_1s_window"],
        "tightest_span_of_limit_plus_one_s": ours["tightest_span_of_limit_plus_one_s"],
        "without_ahead_steady_share_of_limit": runs[1]["steady_share_of_limit"] if without else None,
        "plain_steady_share_of_limit": ours["plain"]["steady_share_of_limit"] if plain_seconds else None,
        "ratio_to_plain": (round(ours["steady_share_of_limit"] / ours["plain"]["steady_share_of_limit"], 2)
                           if plain_seconds and ours["plain"]["steady_share_of_limit"] else None),
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nRe-extraction through the stack: {documents} documents × {args.chunks} chunks, limit "
          f"{ours['limit_per_s']:g}/s, latency {args.latency_mean:g} s ± {args.latency_jitter:g} s, "
          f"batch {args.batch_size}")
    print(f"{'design':<15} {'steady share':>12} {'lowest 10 s':>11} {'busiest 1 s':>11} {'seconds':>8} {'runs':>5}")
    for run in runs:
        print(f"{run['label']:<15} {run['steady_share_of_limit']:>12.1%} {run['lowest_10s_window_share']:>11.1%} "
              f"{run['busiest_1s_window']:>11} {run['seconds']:>8} {run['runs']:>5}")
        print(f"    calls per 10 s: {run['calls_per_10s_window']}; tightest {ours['limit_per_s'] + 1:g} calls: "
              f"{run['tightest_span_of_limit_plus_one_s']} s; medians: {run['median_s']}")
    if plain_seconds:
        plain = ours["plain"]
        print(f"{'plain Celery':<15} {plain['steady_share_of_limit']:>12.1%} {plain['lowest_10s_window_share']:>11.1%} "
              f"{plain['busiest_1s_window']:>11} {plain['seconds']:>8} {'-':>5}"
              f"{'' if plain['finished'] else f'  (stopped after {plain_seconds:g} s)'}")
        print(f"    calls per 10 s: {plain['calls_per_10s_window']}; ours / plain: {result['ratio_to_plain']}x")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
