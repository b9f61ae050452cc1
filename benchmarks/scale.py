"""Orchestration at scale: one partition per document, at 1,000 -> 10,000 -> 100,000 documents.

    eval "$(scripts/services env)"
    python -m benchmarks.scale                       # 1,000, 10,000 and 100,000 documents
    python -m benchmarks.scale --sizes 1000,10000    # the sizes given
    python -m benchmarks.scale --quick               # 500 documents only

No LLM is called: what is measured is orchestration, on a fresh PostgreSQL app database and a fresh
PostgreSQL Dagster database per size (reached through the services' PgBouncer when
`LUMIKB_DAGSTER_PG_URL` names one, as the test stacks and production reach it), each holding one
KB whose documents are all extracted (the ledger says so), one chunk each. For each size:

- **registering partitions**: the partitions sensor's ticks (the real sensor, evaluated in this
  process) from an empty cursor until every document has its `documents` partition: the sum of
  the ticks' durations (the daemon adds its interval, `LUMIKB_PARTITIONS_SENSOR_INTERVAL_S`,
  between ticks);
- **an idle tick** (nothing changed; median of 3), the **reconciling tick** that compares the
  whole partition list with the documents (every `LUMIKB_PARTITIONS_RECONCILE_S`), and a **tick
  with 1% of the documents changed** (new revisions: it requests their processing runs);
- **`lumikb drift`**, the command (a process of its own, interpreter start included);
- **`lumikb reextract KB --all` to the first run and to all runs queued**: the command, then a
  real `dagster-daemon` (its backfill daemon) creates the runs; runs are counted in the Dagster
  database as they appear (the run queue launches none: `max_concurrent_runs` is 0 here, so only
  creating and queueing is timed). "All" is ceil(documents / `LUMIKB_REEXTRACT_BATCH_SIZE`) runs;
  the wait for it is cut at `--queue-timeout` seconds, and the figure is then reported as missing;
- **the ledger queries of one batch**: claiming and closing the rows of one batch of
  `LUMIKB_REEXTRACT_BATCH_SIZE` documents, as an extract and a write step do (statements and
  milliseconds), against a ledger of that size.

The numbers go to `benchmarks/results/scale.json`, one entry per size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "scale.json"
DEFAULT_SIZES = (1_000, 10_000, 100_000)
TARGETS_AT_100K = {"register_partitions_s": 60.0, "idle_tick_s": 10.0, "drift_s": 5.0, "first_run_s": 60.0}
SCHEMA = """
entity_types:
  - name: Organization
    description: A company.
  - name: Person
    description: A human being.
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
    description: The organisation employs the person.
"""
_INSERT_PAGE = 5000


def _admin_url() -> str:
    url = os.environ.get("LUMIKB_DATABASE_URL", "")
    if not url.startswith("postgresql"):
        raise SystemExit("benchmarks.scale needs PostgreSQL: eval \"$(scripts/services env)\" (LUMIKB_DATABASE_URL)")
    return url


def _create_database(prefix: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = make_url(_admin_url())
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def _drop_database(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    engine = create_engine(parsed.set(database="postgres", drivername="postgresql+psycopg"),
                           isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
    engine.dispose()


def _seed(url: str, slug: str, documents: int) -> list[str]:
    """One KB whose documents are all extracted at schema version 1 (one chunk each)."""
    from sqlalchemy import insert

    from lumikb_pipeline.db import catalog
    from lumikb_pipeline.db.models import Chunk, Document, ExtractionRecord, ExtractionStatus, utcnow
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.domain.partition_keys import document_partition_key
    from lumikb_pipeline.domain.schema import parse_schema_text

    ids = [str(uuid.uuid4()) for _ in range(documents)]
    with session_scope(url) as session:
        kb = catalog.create_kb(session, slug, parse_schema_text(SCHEMA))
        kb_id = kb.id
    now = utcnow()
    for start in range(0, documents, _INSERT_PAGE):
        page = list(enumerate(ids[start : start + _INSERT_PAGE], start))
        with session_scope(url) as session:
            session.execute(insert(Document), [
                {"id": doc_id, "kb_id": kb_id, "title": f"Filing {i}", "source": f"filings/{i:06d}.txt",
                 "partition_key": document_partition_key(slug, f"Filing {i}", doc_id),
                 "content_hash": f"{i:064x}", "revision": 1, "created_at": now, "updated_at": now}
                for i, doc_id in page
            ])
            session.execute(insert(Chunk), [
                {"id": str(uuid.uuid4()), "document_id": doc_id, "ordinal": 0,
                 "text": f"Acme {i} employs Jane Doe {i}.", "token_count": 9, "content_hash": f"{i:064x}"}
                for i, doc_id in page
            ])
            session.execute(insert(ExtractionRecord), [
                {"kb_id": kb_id, "document_id": doc_id, "schema_version": 1, "status": ExtractionStatus.SUCCEEDED,
                 "document_revision": 1, "attempts": 1, "finished_at": now, "updated_at": now}
                for _i, doc_id in page
            ])
    return ids


class _Sensor:
    """The partitions sensor, evaluated in this process with its cursor kept here."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance
        self.cursor: str | None = None

    def tick(self) -> tuple[float, int, int]:
        """One tick: (seconds, partitions added, run requests)."""
        from dagster import build_sensor_context

        from lumikb_pipeline.resources import DatabaseResource, GraphStoreResource
        from lumikb_pipeline.sensors.document_partitions import document_partitions_sensor

        before = len(self.instance.get_dynamic_partitions("documents"))
        context = build_sensor_context(
            instance=self.instance, cursor=self.cursor,
            resources={"database": DatabaseResource(), "graph_store": GraphStoreResource()},
        )
        started = time.perf_counter()
        result = document_partitions_sensor(context)
        elapsed = time.perf_counter() - started
        self.cursor = getattr(result, "cursor", None) or context.cursor
        requests = len(getattr(result, "run_requests", None) or [])
        after = len(self.instance.get_dynamic_partitions("documents"))
        return elapsed, after - before, requests

    def reset_reconciled(self) -> None:
        data = json.loads(self.cursor or "{}")
        data["reconciled_at"] = datetime(1970, 1, 1, tzinfo=UTC).isoformat()
        self.cursor = json.dumps(data)


def _change_documents(url: str, doc_ids: Sequence[str]) -> None:
    """New revisions of these documents (a content change, as `lumikb ingest` records it)."""
    from sqlalchemy import update

    from lumikb_pipeline.db.models import Document, utcnow
    from lumikb_pipeline.db.session import session_scope

    with session_scope(url) as session:
        session.execute(update(Document).where(Document.id.in_(list(doc_ids)))
                        .values(revision=Document.revision + 1, updated_at=utcnow()))


def _mark_current(url: str, doc_ids: Sequence[str]) -> None:
    """Record the changed documents as extracted at their new revision (so the daemon's own sensor
    later has nothing to process and the re-extraction is the only work)."""
    from sqlalchemy import update

    from lumikb_pipeline.db.models import ExtractionRecord
    from lumikb_pipeline.db.session import session_scope

    with session_scope(url) as session:
        session.execute(update(ExtractionRecord).where(ExtractionRecord.document_id.in_(list(doc_ids)))
                        .values(document_revision=2))


def _lumikb(env: dict[str, str], *args: str, timeout: float = 900) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from lumikb_pipeline.cli import app; app()", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"lumikb {' '.join(args)} failed ({done.returncode}): {done.stderr[-800:]}")
    return time.perf_counter() - started, done


def _start_daemon(env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    workspace = home / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: lumikb_pipeline.definitions\n"
        f"      working_directory: {REPO}\n      location_name: lumikb_pipeline\n"
    )
    log = open(home / "daemon.log", "wb")  # noqa: SIM115 - owned by the child
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(workspace)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    log.close()
    return daemon


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _ledger_batch(url: str, doc_ids: Sequence[str], job_id: str) -> dict[str, float]:
    """Claim and close one batch's ledger rows as the extract and write steps do; statements and ms."""
    from sqlalchemy import event

    from lumikb_pipeline.db import ledger
    from lumikb_pipeline.db.session import get_engine, session_scope

    engine = get_engine(url)
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    event.listen(engine, "before_cursor_execute", count)
    claimant = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        started = time.perf_counter()
        with session_scope(url) as session:
            ledger.records_for(session, doc_ids, 1)
            claimed = sum(ledger.claim(session, doc_id, 1, claimant, job_id) for doc_id in doc_ids)
        with session_scope(url) as session:
            ledger.records_for(session, doc_ids, 1)
            for doc_id in doc_ids:
                ledger.mark_succeeded(session, doc_id, 1, claimant, ledger.Outcome())
        elapsed = time.perf_counter() - started
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return {"documents": len(doc_ids), "claimed": claimed, "statements": statements, "ms": round(elapsed * 1000, 1)}


def run_size(documents: int, queue_timeout_s: float) -> dict[str, Any]:
    """Every figure at one size."""
    from dagster import DagsterInstance, RunsFilter

    app_url = _create_database("scale_app")
    dagster_url = _create_database("scale_dagster")
    home = Path(tempfile.mkdtemp(prefix="lumikb-scale-"))
    daemon: subprocess.Popen[bytes] | None = None
    saved = dict(os.environ)
    try:
        from lumikb_pipeline.core.config import get_settings, load_settings
        from lumikb_pipeline.db import migrate
        from lumikb_pipeline.infra.dagster_instance import instance_config, render_instance_yaml
        from lumikb_pipeline_tests.dagster.stack import dagster_url as through_pooler

        env = {key: value for key, value in os.environ.items() if not key.startswith(("LUMIKB_", "DAGSTER_"))}
        env.update({
            "LUMIKB_HOME": str(home / "lumikb"), "DAGSTER_HOME": str(home / "dagster"),
            # Dagster's storage through the services' PgBouncer, as production's.
            "LUMIKB_DATABASE_URL": app_url, "LUMIKB_DAGSTER_PG_URL": through_pooler(dagster_url),
            # A database number of its own for the jobs' progress keys.
            "LUMIKB_REDIS_URL": saved.get("LUMIKB_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/14",
            "LUMIKB_LLM_MODEL": "lumikb/offline",
            "PYTHONPATH": os.pathsep.join([str(REPO), saved.get("PYTHONPATH", "")]),
        })
        if saved.get("CELERY_BROKER_URL"):
            env["CELERY_BROKER_URL"] = saved["CELERY_BROKER_URL"]
        os.environ.clear()
        os.environ.update(env)
        get_settings.cache_clear()
        settings = load_settings()
        migrate.upgrade(app_url)
        (home / "dagster").mkdir(parents=True)
        config = instance_config(settings, postgres=True)
        config["concurrency"]["runs"]["max_concurrent_runs"] = 0  # queue runs, launch none
        (home / "dagster" / "dagster.yaml").write_text(render_instance_yaml(config))
        slug = f"scale{documents}"

        started = time.perf_counter()
        ids = _seed(app_url, slug, documents)
        seed_s = time.perf_counter() - started
        print(f"[scale {documents:,}] seeded in {seed_s:.1f}s", flush=True)

        instance = DagsterInstance.from_config(str(home / "dagster"))
        sensor = _Sensor(instance)
        ticks: list[float] = []
        registered = 0
        while registered < documents and len(ticks) < 1000:
            elapsed, added, _requests = sensor.tick()
            ticks.append(elapsed)
            registered += added
            if added == 0:
                break
        register_s = sum(ticks)
        print(f"[scale {documents:,}] {registered:,} partitions registered in {len(ticks)} tick(s), "
              f"{register_s:.1f}s", flush=True)
        idle = [sensor.tick()[0] for _ in range(3)]
        sensor.reset_reconciled()
        reconcile_s = sensor.tick()[0]
        changed = ids[:: 100][: max(1, documents // 100)]
        _change_documents(app_url, changed)
        changed_s, _added, changed_requests = sensor.tick()
        _mark_current(app_url, changed)
        print(f"[scale {documents:,}] idle tick {statistics.median(idle):.2f}s, reconciling {reconcile_s:.2f}s, "
              f"1% changed {changed_s:.2f}s ({changed_requests} run requests)", flush=True)

        drift_s, _done = _lumikb(env, "drift")
        print(f"[scale {documents:,}] lumikb drift {drift_s:.2f}s", flush=True)

        batch = settings.reextract_batch_size
        expected_runs = math.ceil(documents / batch)
        daemon = _start_daemon(env, home)
        time.sleep(20)  # the daemon loads the code location before it can launch anything
        existing = {r.run_id for r in instance.get_runs()}
        started = time.perf_counter()
        reextract_s, done = _lumikb(env, "reextract", slug, "--all")
        first_run_s = all_runs_s = None
        runs = 0
        while time.perf_counter() - started < queue_timeout_s:
            runs = len([r for r in instance.get_runs(RunsFilter()) if r.run_id not in existing
                        and r.job_name != "document_processing_job"])
            if runs and first_run_s is None:
                first_run_s = time.perf_counter() - started
                print(f"[scale {documents:,}] first run after {first_run_s:.1f}s", flush=True)
            if runs >= expected_runs:
                all_runs_s = time.perf_counter() - started
                break
            time.sleep(0.5 if runs < 100 else 2)
        print(f"[scale {documents:,}] reextract --all: command {reextract_s:.1f}s, {runs:,}/{expected_runs:,} runs "
              f"queued, all after {all_runs_s if all_runs_s is None else round(all_runs_s, 1)}s", flush=True)
        _stop(daemon)
        daemon = None

        from lumikb_pipeline.db.models import Job
        from lumikb_pipeline.db.session import session_scope

        with session_scope(app_url) as session:
            from sqlalchemy import select

            job_id = session.scalar(select(Job.id).order_by(Job.created_at.desc()))
        ledger_batch = _ledger_batch(app_url, ids[-batch:], str(job_id))
        return {
            "documents": documents, "batch_size": batch, "seed_s": round(seed_s, 2),
            "register_partitions_s": round(register_s, 3), "register_ticks": len(ticks),
            "partitions": registered,
            "idle_tick_s": round(statistics.median(idle), 3), "idle_ticks_s": [round(t, 3) for t in idle],
            "reconcile_tick_s": round(reconcile_s, 3),
            "changed_1pct_tick_s": round(changed_s, 3), "changed_documents": len(changed),
            "changed_run_requests": changed_requests,
            "drift_s": round(drift_s, 3),
            "reextract_command_s": round(reextract_s, 3),
            "first_run_s": None if first_run_s is None else round(first_run_s, 2),
            "all_runs_queued_s": None if all_runs_s is None else round(all_runs_s, 2),
            "runs_queued": runs, "runs_expected": expected_runs, "queue_timeout_s": queue_timeout_s,
            "ledger_batch": ledger_batch,
        }
    finally:
        if daemon is not None:
            _stop(daemon)
        os.environ.clear()
        os.environ.update(saved)
        from lumikb_pipeline.db.session import dispose_engines

        dispose_engines()
        _drop_database(app_url)
        _drop_database(dagster_url)


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("registering partitions (s)", "register_partitions_s"), ("idle partitions-sensor tick (s)", "idle_tick_s"),
        ("reconciling tick (s)", "reconcile_tick_s"), ("tick with 1% changed (s)", "changed_1pct_tick_s"),
        ("lumikb drift (s)", "drift_s"), ("lumikb reextract --all, the command (s)", "reextract_command_s"),
        ("reextract --all -> first run (s)", "first_run_s"), ("reextract --all -> all runs queued (s)",
                                                              "all_runs_queued_s"),
    ]
    sizes = result["sizes"]
    print("| figure | " + " | ".join(f"{s['documents']:,}" for s in sizes) + " | target at 100,000 |")
    print("| --- |" + " ---: |" * len(sizes) + " ---: |")
    for label, key in rows:
        values = ["-" if s.get(key) is None else f"{s[key]:.2f}" for s in sizes]
        target = TARGETS_AT_100K.get(key)
        print(f"| {label} | " + " | ".join(values) + f" | {'< ' + str(int(target)) if target else 'report'} |")
    print("| ledger per batch (statements / ms) | " + " | ".join(
        f"{s['ledger_batch']['statements']} / {s['ledger_batch']['ms']:.0f}" for s in sizes) + " | report |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                        help="document counts, comma-separated (default 1000,10000,100000)")
    parser.add_argument("--quick", action="store_true", help="500 documents only")
    parser.add_argument("--queue-timeout", type=float, default=600.0,
                        help="seconds to wait for every re-extraction run to be queued (default 600)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    try:
        sizes = [500] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be whole numbers separated by commas, not {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes must name at least one size of 1 or more")
    sizes_out = [run_size(size, args.queue_timeout) for size in sizes]
    largest = sizes_out[-1]
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count()},
        "targets_at_100000": TARGETS_AT_100K,
        "sizes": sizes_out,
        "largest": largest,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
