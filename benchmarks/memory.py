"""Memory over time: the RSS of the Celery workers while documents go through the whole stack.

    python -m benchmarks.memory                 # 5,000 documents, the issue's job (docs/benchmarks.md holds the latest)
    python -m benchmarks.memory --quick         # 120 documents in batches of 40

The real deployment of `lumikb up` (lumikb_pipeline_tests/dagster/stack.py: Dagster code server,
webserver and daemon on PostgreSQL, one Celery worker group per queue, Redis, Neo4j) with the fake
LLM server answering at once, so what is measured is our processes, not a provider. Documents are
ingested; the partitions sensor launches `document_processing_job` runs whose steps run on the
`document_processing` worker. Every second this samples the RSS of each worker group (the Celery
parent and its prefork children, psutil); every 5 s (every second with `--quick`) the connections
the worker groups hold, as PostgreSQL, Redis and Neo4j list them. A child that ends and is replaced
is a recycle point (`--max-tasks-per-child`, set low here so that recycling shows, or
`--max-memory-per-child`).

Figures: the growth of the busy worker group's RSS from the end of warm-up (the first 20% of
documents) to the end (medians of the 10% of samples at each place; target < 10%), the largest
child, and the spread of each connection count during the run (Redis's also per client name: our
`lumikb` and `lumikb-llm` clients, Celery's `celery`). The PNG (`--png`) draws each group's
total and each child's RSS over time, with the recycle points and warm-up marked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "memory.json"
DEFAULT_PNG = REPO / "docs" / "worker-memory.png"
QUEUES = ("document_processing", "reprocessing")
WARM_UP_SHARE = 0.2


def _stack_overrides(args: argparse.Namespace) -> dict[str, str]:
    return {
        # Answers at once and a limit far above what the machine can do: the workers are the bound.
        "LUMIKB_LLM_RATE_LIMIT": "200/s",
        "LUMIKB_LLM_MAX_IN_FLIGHT": "16",
        "LUMIKB_REEXTRACT_BATCH_SIZE": str(args.batch_size),
        # Production's worker pool size (the stack's test default is 4).
        "LUMIKB_DOCUMENT_PROCESSING_CONCURRENCY": "2",
        "LUMIKB_WORKER_MAX_TASKS_PER_CHILD": str(args.max_tasks_per_child),
        "LUMIKB_WORKER_MAX_MEMORY_KB": str(args.max_memory_per_child_kb),
        "LUMIKB_PARTITIONS_SENSOR_INTERVAL_S": "5",
    }


class Sampler(threading.Thread):
    """Samples the worker groups' RSS every second and their connections every `connections_every`."""

    def __init__(self, workers: dict[str, int], probe_connections: Callable[[], dict[str, int]],
                 connections_every_s: float = 5.0) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.workers = workers
        self.probe_connections = probe_connections
        self.connections_every_s = connections_every_s
        self.started = time.monotonic()
        self.rss: list[dict[str, Any]] = []
        self.connections: list[dict[str, Any]] = []
        self.done_documents = 0
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        from lumikb_pipeline_tests.orchestration.resource_probe import sample_group

        next_connections = 0.0
        while not self._stop_event.is_set():
            now = time.monotonic() - self.started
            row: dict[str, Any] = {"t": round(now, 2), "documents": self.done_documents}
            for queue, pid in self.workers.items():
                sample = sample_group(pid)
                if sample is not None:
                    row[queue] = {"parent": sample.parent_rss, "helpers": sample.helpers_rss,
                                  "children": {str(k): v for k, v in sample.children_rss.items()}}
            self.rss.append(row)
            if now >= next_connections:
                try:
                    self.connections.append({"t": round(now, 2), "documents": self.done_documents,
                                             **self.probe_connections()})
                except Exception as exc:  # noqa: BLE001 - a failed probe is a gap, not the end of the run
                    print(f"connection probe failed: {exc}", file=sys.stderr)
                next_connections = now + self.connections_every_s
            self._stop_event.wait(max(0.0, 1.0 - (time.monotonic() - self.started - now)))


def _total(row: dict[str, Any], queue: str) -> int | None:
    group = row.get(queue)
    if group is None:
        return None
    return int(group["parent"] + group.get("helpers", 0) + sum(group["children"].values()))


def _window_median(rows: list[dict[str, Any]], queue: str, start_s: float, end_s: float) -> float:
    values = [v for r in rows if start_s <= r["t"] <= end_s and (v := _total(r, queue)) is not None]
    return float(statistics.median(values))


def recycle_points(rows: list[dict[str, Any]], queue: str) -> list[float]:
    """Times at which a prefork child appeared after the first sample (a replaced child)."""
    seen: set[str] = set()
    points = []
    for index, row in enumerate(rows):
        children = set(row.get(queue, {}).get("children", {}))
        if index and children - seen:
            points.append(row["t"])
        seen |= children
    return points


def analyse(rows: list[dict[str, Any]], documents: int, warm_up_end_s: float, end_s: float) -> dict[str, Any]:
    """Growth from the end of warm-up to the end, per worker group (medians of 10%-of-run windows)."""
    window = max(5.0, 0.1 * (end_s - warm_up_end_s))
    result: dict[str, Any] = {}
    for queue in QUEUES:
        after_warm_up = _window_median(rows, queue, warm_up_end_s, warm_up_end_s + window)
        at_end = _window_median(rows, queue, end_s - window, end_s)
        children = [v for r in rows for v in r.get(queue, {}).get("children", {}).values()]
        parents = [r[queue]["parent"] for r in rows if queue in r]
        result[queue] = {
            "rss_after_warm_up_mib": round(after_warm_up / 2**20, 1),
            "rss_at_end_mib": round(at_end / 2**20, 1),
            "growth_pct": round(100 * (at_end - after_warm_up) / after_warm_up, 2),
            "peak_group_mib": round(max(t for r in rows if (t := _total(r, queue)) is not None) / 2**20, 1),
            "largest_child_mib": round(max(children, default=0) / 2**20, 1),
            "parent_growth_pct": round(100 * (parents[-1] - parents[0]) / parents[0], 2) if parents else None,
            "recycle_points_s": recycle_points(rows, queue),
        }
    return result


def connection_spread(samples: list[dict[str, Any]], warm_up_end_s: float) -> dict[str, dict[str, float]]:
    """Per server, after warm-up: min, max and last count; `peak_growth`, the highest count of the
    second half less the highest of the first (a leak: > 0); and `median_growth`, the median count of
    the second half less that of the first, for reference.

    The counts follow the steps in flight: a child's pools open with its steps and close when it is
    recycled, so the workers go back to their idle count whenever they are between steps, and a half's
    median says how busy that half was. A leak keeps connections that no step uses, so every later
    peak stands higher than the earlier ones; both halves of a long job reach the workers' full
    concurrency, so their peaks compare like with like."""
    spread = {}
    servers = sorted({key for s in samples for key in s} - {"t", "documents"})
    for server in servers:  # postgres, redis, neo4j, and redis:<client name>
        after = [s for s in samples if s["t"] >= warm_up_end_s]
        if len([s for s in after if server in s]) < 2:
            continue
        # A sample without a Redis client name counted none of that name.
        values = [s.get(server, 0) for s in after]
        middle = after[0]["t"] + (after[-1]["t"] - after[0]["t"]) / 2
        first = [s.get(server, 0) for s in after if s["t"] <= middle]
        second = [s.get(server, 0) for s in after if s["t"] > middle]
        spread[server] = {"min": min(values), "max": max(values), "last": values[-1],
                          "peak_growth": max(second) - max(first),
                          "median_growth": statistics.median(second) - statistics.median(first)}
    return spread


def draw(path: Path, rows: list[dict[str, Any]], analysis: dict[str, Any], warm_up_end_s: float,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(QUEUES), 1, figsize=(11, 7), sharex=True)
    for ax, queue in zip(axes, QUEUES, strict=True):
        times = [r["t"] for r in rows if queue in r]
        ax.plot(times, [_total(r, queue) / 2**20 for r in rows if queue in r], color="black", lw=1.6,  # type: ignore[operator]
                label="group total (parent, children and their helper processes)")
        ax.plot(times, [r[queue]["parent"] / 2**20 for r in rows if queue in r], color="tab:blue", lw=1,
                label="Celery parent")
        children: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            for pid, rss in r.get(queue, {}).get("children", {}).items():
                children.setdefault(pid, []).append((r["t"], rss / 2**20))
        for index, points in enumerate(children.values()):
            ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:orange", lw=0.8, alpha=0.8,
                    label="prefork children (one line each)" if index == 0 else None)
        for index, point in enumerate(analysis[queue]["recycle_points_s"]):
            ax.axvline(point, color="tab:red", ls=":", lw=0.8, label="child recycled" if index == 0 else None)
        ax.axvline(warm_up_end_s, color="tab:green", ls="--", lw=1, label="end of warm-up")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"worker {queue}: growth after warm-up {analysis[queue]['growth_pct']:+.1f}%", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right", framealpha=0.9)
    axes[-1].set_xlabel("seconds since the documents were ingested")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace, left_behind: list[str]) -> dict[str, Any]:
    from lumikb_pipeline_tests.dagster import stack as stack_module
    from lumikb_pipeline_tests.dagster.helpers import create_kb, ingest, ledger_counts, write_documents
    from lumikb_pipeline_tests.orchestration import resource_probe

    overrides = _stack_overrides(args)
    base_env = stack_module.stack_env
    # The harness's environment with this benchmark's settings on top (start_stack reads it by name).
    stack_module.stack_env = lambda *a, **k: {**base_env(*a, **k), **overrides}
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lumikb-memory-"))
    stack = stack_module.start_stack(root)
    saved = dict(os.environ)
    os.environ.update(stack.env)
    from lumikb_pipeline.core.config import get_settings, load_settings
    from lumikb_pipeline.db.session import dispose_engines
    from lumikb_pipeline.orchestration.processes import read_pid

    get_settings.cache_clear()
    try:
        settings = load_settings()
        workers = {queue: read_pid(settings, f"worker-{queue}") for queue in QUEUES}
        missing = [queue for queue, pid in workers.items() if pid is None]
        if missing:
            raise RuntimeError(f"no worker pid for {missing}")
        app_db = stack.app_db_url.rsplit("/", 1)[1]

        def probe() -> dict[str, int]:
            pids = [p.pid for pid in workers.values() for p in resource_probe.worker_group(pid or 0)]
            ports = resource_probe.local_ports(pids)
            redis_by_name = resource_probe.redis_connections_by_name(stack.redis_dbs[0], ports)
            return {
                "postgres": resource_probe.postgres_connections(stack.app_db_url, app_db, ports),
                "redis": sum(redis_by_name.values()),
                "neo4j": resource_probe.neo4j_connections(ports),
                # Which of Redis's: the pipeline's clients, the LLM loops' pools, Celery's (unnamed).
                **{f"redis:{name or 'celery'}": count for name, count in redis_by_name.items()},
            }

        slug = f"mem-{os.getpid()}"
        create_kb(slug)
        write_documents(root / "docs", slug.replace("-", ""), args.documents)
        # A quick run is over seconds after its warm-up: its connections are counted every second, or
        # the part after warm-up held one count or none (a 15-s run, 2026-12-02).
        sampler = Sampler({q: pid for q, pid in workers.items() if pid is not None}, probe,
                          connections_every_s=1.0 if args.quick else 5.0)
        sampler.start()
        started = time.monotonic()
        ingest(slug, root / "docs")
        warm_up_end_s: float | None = None
        deadline = started + args.timeout
        while True:
            counts = ledger_counts(slug)
            done = counts[(1, "succeeded")] + counts[(1, "failed")]
            sampler.done_documents = done
            if warm_up_end_s is None and done >= WARM_UP_SHARE * args.documents:
                warm_up_end_s = time.monotonic() - sampler.started
            if done >= args.documents:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {args.documents} documents after {args.timeout:.0f} s")
            time.sleep(2)
        end_s = time.monotonic() - sampler.started
        elapsed = time.monotonic() - started
        time.sleep(2)
        sampler.stop()
        assert warm_up_end_s is not None
        analysis = analyse(sampler.rss, args.documents, warm_up_end_s, end_s)
        busy = analysis["document_processing"]
        result: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "documents": args.documents,
            "failed_documents": ledger_counts(slug)[(1, "failed")],
            "seconds": round(elapsed, 1),
            "documents_per_s": round(args.documents / elapsed, 2),
            "warm_up_end_s": round(warm_up_end_s, 1),
            "settings": overrides,
            "workers": analysis,
            "rss_growth_after_warm_up_pct": busy["growth_pct"],
            "recycles": len(busy["recycle_points_s"]),
            "connections": connection_spread(sampler.connections, warm_up_end_s),
            "samples": {"rss": sampler.rss, "connections": sampler.connections},
        }
        if args.png:
            title = (f"Celery worker RSS, {args.documents:,} documents through `lumikb up` "
                     f"({args.documents / elapsed:.1f} docs/s; --max-tasks-per-child {args.max_tasks_per_child}, "
                     f"{datetime.now(UTC):%Y-%m-%d})")
            draw(args.png, sampler.rss, analysis, warm_up_end_s, title)
            result["png"] = str(args.png)
        return result
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        dispose_engines()
        stack_module.stack_env = base_env
        stack_module.stop_stack(stack)
        # What the processes left in their TMPDIR (the stack's own folder) once they all stopped.
        left_behind[:] = sorted(os.listdir(root / "tmp")) if (root / "tmp").is_dir() else []
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="120 documents in batches of 40")
    parser.add_argument("--documents", type=int, default=None, help="default 5,000 (120 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="documents per run (default 150, 40 with --quick; production's default is 25)")
    parser.add_argument("--max-tasks-per-child", type=int, default=None,
                        help="steps a worker child runs before it is replaced (default 3, 2 with --quick)")
    parser.add_argument("--max-memory-per-child-kb", type=int, default=1_500_000)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds the documents may take")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None,
                        help=f"where to draw the figure (default {DEFAULT_PNG.relative_to(REPO)}; "
                             "with --quick next to the JSON)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.documents is None:
        args.documents = 120 if args.quick else 5000
    if args.batch_size is None:
        args.batch_size = 40 if args.quick else 150
    if args.max_tasks_per_child is None:
        args.max_tasks_per_child = 2 if args.quick else 3
    if args.png is None:
        args.png = args.output.with_suffix(".png") if args.quick else DEFAULT_PNG
    left_behind: list[str] = []
    result = run(args, left_behind)
    result["temp_files_left"] = len(left_behind)
    result["temp_files_left_names"] = left_behind[:20]
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
