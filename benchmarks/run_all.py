"""Every benchmark in one command, and one table of figures against their targets.

    benchmarks/run            # the full runs (docs/benchmarks.md holds the latest)
    benchmarks/run --quick    # a few minutes: every benchmark at a small size (CI runs this)

Each benchmark runs in a process of its own (as `python -m benchmarks.<name>`) and writes its JSON;
this runner reads the figures out of those files, prints one table (figure, value, target, met or
missed) and writes them all to `benchmarks/results/summary.json`. A benchmark that fails to run is
a row with its error, not a crash. The exit code is 0 when every benchmark ran, whatever the
figures: a missed target is a finding to report, not a broken build.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SUMMARY = RESULTS / "summary.json"


@dataclass(frozen=True)
class Figure:
    """One measured figure and the target it is held to (`comparator` is `>=`, `<=` or `>`)."""

    name: str
    read: Callable[[dict[str, Any]], float | None]
    target: float | None
    comparator: str = ">="
    unit: str = ""


@dataclass(frozen=True)
class Benchmark:
    """A benchmark module, its full and quick arguments, and the figures of its JSON."""

    name: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    figures: tuple[Figure, ...]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "graph_writes",
        full=(),
        quick=("--quick", "--workers", "2"),
        figures=(
            Figure("graph writes: store entities/s (median of rounds)",
                   lambda r: r["store"]["entities_per_s"]["median"], 5000, unit="/s"),
            Figure("graph writes: store vs naive writer (medians)", lambda r: r["ratio"], 20, unit="x"),
            Figure("graph writes: store's share of the create-only lower bound (medians)",
                   lambda r: r["share_of_lower_bound"], 0.85),
            # What bounds the share (docs/benchmarks.md, "Graph writes"): idempotence alone, and CPU.
            Figure("graph writes: idempotent bound's share of the create-only lower bound (medians)",
                   lambda r: r["idempotent_bound_share_of_lower_bound"], None),
            Figure("graph writes: store's share of the idempotent bound (medians)",
                   lambda r: r["share_of_idempotent_bound"], None),
            Figure("graph writes: store's client CPU per document (median of rounds)",
                   lambda r: r["store"]["cpu_ms_per_document"]["client"], None, "<=", "ms"),
            Figure("graph writes: store's Neo4j CPU per document (median of rounds)",
                   lambda r: r["store"]["cpu_ms_per_document"]["neo4j"], None, "<=", "ms"),
            Figure("graph writes: lower bound's client + Neo4j CPU per document (median of rounds)",
                   lambda r: r["lower_bound"]["cpu_ms_per_document"]["client"]
                   + r["lower_bound"]["cpu_ms_per_document"]["neo4j"], None, "<=", "ms"),
        ),
    ),
    Benchmark(
        "hub_writes",
        full=("--documents", "20000"),  # both stores in about 3.5 minutes here; 100,000: docs/benchmarks.md
        quick=("--quick",),
        figures=(
            Figure("hub writes (Neo4j): per-document write time, last 10% / first 10% (medians)",
                   lambda r: r["neo4j"]["last_to_first_ratio"], 1.5, "<=", "x"),
            Figure("hub writes (embedded): per-document write time, last 10% / first 10% (medians)",
                   lambda r: r["embedded"]["last_to_first_ratio"], 1.5, "<=", "x"),
            Figure("hub writes (Neo4j): write time per document in the last 10% (median)",
                   lambda r: r["neo4j"]["per_document_ms"]["last_10pct"]["median"], None, "<=", "ms"),
            Figure("hub writes: documents naming the hub pair", lambda r: r["config"]["documents"], None,
                   unit="documents"),
        ),
    ),
    Benchmark(
        "llm_throughput",
        full=(),
        quick=("--chunks", "60", "--plain-budget", "8", "--latency-mean", "0.5", "--latency-jitter", "0.2"),
        figures=(
            Figure("LLM calls: share of the limit (limiter, 2 workers)", lambda r: r["ours_share_of_limit"], 0.93),
            Figure("LLM calls: busiest 1-s window at the server", lambda r: r["ours"]["busiest_1s_window"], None,
                   "<=", "calls"),
            Figure("LLM calls: shortest time holding limit + 1 calls (over 1 s: never over)",
                   lambda r: r["ours"]["tightest_span_of_limit_plus_one_s"], 1.0, ">", "s"),
            Figure("LLM calls: ours vs one-chunk-at-a-time chunks/s", lambda r: r["speedup_vs_plain"], None,
                   unit="x"),
        ),
    ),
    Benchmark(
        "scale",
        # The wait for every run to be queued is cut at 120 s per size (docs/benchmarks.md).
        full=("--sizes", "1000,10000,100000", "--queue-timeout", "120"),
        quick=("--quick",),
        # The targets are the at 100,000 documents; each figure is read at the largest size run.
        figures=(
            Figure("scale: documents (the largest size run)", lambda r: r["largest"]["documents"], None),
            Figure("scale: registering the partitions (s)", lambda r: r["largest"]["register_partitions_s"], 60,
                   "<=", "s"),
            Figure("scale: idle partitions-sensor tick (s)", lambda r: r["largest"]["idle_tick_s"], 10, "<=", "s"),
            Figure("scale: reconciling partitions-sensor tick (s)", lambda r: r["largest"]["reconcile_tick_s"], 10,
                   "<=", "s"),
            Figure("scale: partitions-sensor tick with 1% changed (s)",
                   lambda r: r["largest"]["changed_1pct_tick_s"], None, "<=", "s"),
            Figure("scale: lumikb drift (s)", lambda r: r["largest"]["drift_s"], 5, "<=", "s"),
            Figure("scale: reextract --all to the first run (s)", lambda r: r["largest"]["first_run_s"], 60, "<=",
                   "s"),
            Figure("scale: reextract --all to all runs queued (s)", lambda r: r["largest"]["all_runs_queued_s"],
                   None, "<=", "s"),
            Figure("scale: ledger statements per batch", lambda r: r["largest"]["ledger_batch"]["statements"], None,
                   "<="),
            Figure("scale: ledger time per batch (ms)", lambda r: r["largest"]["ledger_batch"]["ms"], None, "<=",
                   "ms"),
        ),
    ),
    Benchmark(
        "memory",
        full=(),
        quick=("--quick",),
        figures=(
            Figure("worker memory: RSS growth after warm-up (document_processing worker group)",
                   lambda r: r["rss_growth_after_warm_up_pct"], 10, "<=", "%"),
            Figure("worker memory: worker children recycled during the run", lambda r: r["recycles"], None,
                   unit="children"),
            Figure("worker connections: PostgreSQL, peak growth after warm-up (second half's highest less the first's)",
                   lambda r: r["connections"]["postgres"]["peak_growth"], 0, "<=", "connections"),
            Figure("worker connections: Redis, peak growth after warm-up (second half's highest less the first's)",
                   lambda r: r["connections"]["redis"]["peak_growth"], 0, "<=", "connections"),
            Figure("worker connections: Neo4j, peak growth after warm-up (second half's highest less the first's)",
                   lambda r: r["connections"]["neo4j"]["peak_growth"], 0, "<=", "connections"),
            Figure("temp files left by the processes", lambda r: r["temp_files_left"], 0, "<=", "files"),
        ),
    ),
    Benchmark(
        "reextraction_saturation",
        # The configuration (1,000 documents × 5 chunks at 20/s, latency 0.5-1.5 s, batches of
        # the default 100); the design without extraction ahead runs on its own (docs/benchmarks.md).
        full=("--documents", "1000", "--chunks", "5", "--limit", "20/s", "--batch-size", "100",
              "--no-without-ahead", "--plain-seconds", "120"),
        quick=("--quick", "--plain-seconds", "20"),  # the plain design is latency-bound: 20 s show it
        figures=(
            Figure("re-extraction through the stack: share of the limit (steady part)",
                   lambda r: r["steady_share_of_limit"], 0.9),
            Figure("re-extraction through the stack: lowest 10-s window (share of the limit)",
                   lambda r: r["lowest_10s_window_share"], 0.9),
            Figure("re-extraction through the stack: busiest 1-s window at the server",
                   lambda r: r["busiest_1s_window"], None, "<=", "calls"),
            Figure("re-extraction through the stack: shortest time holding limit + 1 calls (over 1 s: never over)",
                   lambda r: r["tightest_span_of_limit_plus_one_s"], 1.0, ">", "s"),
            Figure("plain Celery design (seed): share of the limit (steady part)",
                   lambda r: r["plain_steady_share_of_limit"], None),
            Figure("re-extraction through the stack vs the plain Celery design (shares of the limit)",
                   lambda r: r["ratio_to_plain"], None, unit="x"),
        ),
    ),
    Benchmark(
        "orchestration_overhead",
        full=(),
        quick=("--quick",),
        figures=(
            Figure("orchestration overhead per document, offline model: stack vs in-process (median)",
                   lambda r: r["overhead_ms_per_document"]["median"], 50, "<=", "ms"),
            Figure("offline re-extraction through the stack, documents/s (median)",
                   lambda r: r["stack_documents_per_s"], None, unit="/s"),
            Figure("offline re-extraction in-process, documents/s (median)",
                   lambda r: r["in_process_documents_per_s"], None, unit="/s"),
        ),
    ),
)

_COMPARATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}


def _limit_target(benchmark: Benchmark, figure: Figure, result: dict[str, Any]) -> float | None:
    # The busiest second may hold at most the limit itself, which the run chose.
    if benchmark.name == "llm_throughput" and figure.comparator == "<=":
        return float(result["rate_limit_per_s"])
    if benchmark.name == "reextraction_saturation" and figure.comparator == "<=":
        return float(result["limit_per_s"])
    return figure.target


def result_path(name: str, quick: bool) -> Path:
    """Where a benchmark's own JSON goes when `benchmarks/run` runs it."""
    return RESULTS / f"{name}{'.quick' if quick else ''}.json"


def run_benchmark(benchmark: Benchmark, quick: bool, timeout_s: float) -> list[dict[str, Any]]:
    """Run one benchmark; one row per figure (value None and the error when it did not run)."""
    output = result_path(benchmark.name, quick)
    output.unlink(missing_ok=True)
    argv = [sys.executable, "-m", f"benchmarks.{benchmark.name}", *(benchmark.quick if quick else benchmark.full),
            "--output", str(output)]
    started = time.monotonic()
    error = None
    try:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        print(done.stdout, end="")
        if not output.exists():
            error = f"exit {done.returncode}, no result file: {done.stderr.strip()[-400:]}"
    except subprocess.TimeoutExpired:
        error = f"did not finish within {timeout_s:.0f} s"
    result = json.loads(output.read_text()) if error is None else {}
    rows = []
    for figure in benchmark.figures:
        value = None
        target = figure.target
        row_error = error
        if error is None:
            try:
                value = figure.read(result)
            except (KeyError, IndexError, TypeError) as exc:  # reported as missing; the other figures stand
                row_error = f"not in {output.name}: {type(exc).__name__}: {exc}"
            target = _limit_target(benchmark, figure, result)
        met = None if value is None or target is None else bool(_COMPARATORS[figure.comparator](value, target))
        rows.append({
            "benchmark": benchmark.name, "figure": figure.name, "value": value, "unit": figure.unit,
            "target": target, "comparator": figure.comparator, "met": met, "error": row_error,
            "seconds": round(time.monotonic() - started, 1), "result_file": str(output.relative_to(REPO)),
        })
    return rows


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """The one table: figure, value, target, met or missed."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="lumikb_pipeline benchmarks")
    for column in ("figure", "value", "target", "result"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows:
        value = "-" if row["value"] is None else f"{_number(row['value'])}{row['unit'] and ' ' + row['unit']}"
        target = "report" if row["target"] is None else f"{row['comparator']} {_number(row['target'])}"
        verdict = ("error: " + row["error"][:60]) if row["error"] else {True: "met", False: "missed", None: "-"}[
            row["met"]]
        table.add_row(Text(row["figure"]), value, target, Text(verdict))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark at a small size (a few minutes)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(b.name for b in BENCHMARKS)}")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one benchmark may take")
    parser.add_argument("--output", type=Path, default=SUMMARY)
    args = parser.parse_args(argv)
    unknown = set(args.only) - {b.name for b in BENCHMARKS}
    if unknown:
        parser.error(f"no benchmark named {', '.join(sorted(unknown))}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for benchmark in BENCHMARKS:
        if not args.only or benchmark.name in args.only:
            rows += run_benchmark(benchmark, args.quick, args.timeout)
    print_table(rows)
    summary = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "figures": rows,
        "figure_names": [f.name for b in BENCHMARKS for f in b.figures if not args.only or b.name in args.only],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len({row['benchmark'] for row in rows})} benchmarks in {summary['seconds'] / 60:.1f} min; "
          f"written to {args.output}")
    return 1 if any(row["error"] for row in rows) else 0


__all__ = ["BENCHMARKS", "Benchmark", "Figure", "main"]


if __name__ == "__main__":
    sys.exit(main())
