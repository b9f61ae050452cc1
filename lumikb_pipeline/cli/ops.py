"""`lumikb up|down|status`, `lumikb reextract` and `lumikb schedule …`: running the pipeline."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from lumikb_pipeline.cli.app import app, console, echo, err_console, handle_errors, schedule_app
from lumikb_pipeline.cli.catalog import ready_settings
from lumikb_pipeline.core.errors import LumikbError, UsageError
from lumikb_pipeline.domain.budget import check_max_cost
from lumikb_pipeline.domain.modes import WriteMode

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

    from lumikb_pipeline.core.config import Settings
    from lumikb_pipeline.db.app_settings import DriftSchedule
    from lumikb_pipeline.reextraction.service import Selection


class Strategy(StrEnum):
    AUTO = "auto"
    FULL = "full"


# --------------------------------------------------------------------------- up / down / status


@app.command("up")
@handle_errors
def up(
    detach: Annotated[bool, typer.Option("--detach", help="Start in the background and return.")] = False,
) -> None:
    """Start the Dagster code server, webserver and daemon, and one Celery worker per queue."""
    from lumikb_pipeline.orchestration import processes

    settings = ready_settings()
    processes.prepare_instance(settings)
    port = processes.choose_code_server_port(settings)  # per LUMIKB_HOME: installations never share one
    workspace = processes.write_workspace(settings, port=port)
    specs = processes.service_specs(settings, workspace, code_server_port=port)
    env = processes.service_env(settings)
    try:
        started = processes.start_services(settings, specs, env)
    except (RuntimeError, TimeoutError) as exc:
        processes.stop_services(settings, [spec.name for spec in specs])
        raise LumikbError(f"{exc}; see the logs in {processes.logs_dir(settings)}") from None
    _print_states(settings)
    console.print(
        f"Dagster UI: http://{settings.webserver_host}:{settings.webserver_port}  "
        f"logs: {processes.logs_dir(settings)}", highlight=False,
    )
    if detach or not started:
        return
    console.print("running; Ctrl-C stops everything", highlight=False)
    try:
        while all(process.poll() is None for process in started.values()):
            time.sleep(1)
        dead = [name for name, process in started.items() if process.poll() is not None]
        err_console.print(Text(f"{', '.join(dead)} stopped; stopping the rest", style="red"))
    except KeyboardInterrupt:
        pass
    processes.stop_services(settings, processes.service_names())
    if any(process.poll() not in (None, 0, -15) for process in started.values()):
        raise LumikbError(f"a process failed; see the logs in {processes.logs_dir(settings)}")


@app.command("down")
@handle_errors
def down() -> None:
    """Stop what `lumikb up` started."""
    from lumikb_pipeline.orchestration import processes

    settings = ready_settings()
    stopped = processes.stop_services(settings, processes.service_names())
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", highlight=False)


@app.command("status")
@handle_errors
def status() -> None:
    """Show the processes of `lumikb up` (exit code 1 when one is not running)."""
    settings = ready_settings()
    if not _print_states(settings):
        raise typer.Exit(1)


def _print_states(settings: Settings) -> bool:
    from lumikb_pipeline.orchestration import processes

    table = Table("process", "state", "pid", "log")
    states = processes.service_states(settings, processes.service_names())
    for state in states:
        table.add_row(state.name, Text("running", "green") if state.running else Text("stopped", "red"),
                      str(state.pid or "-"), str(state.log))
    console.print(table)
    return all(state.running for state in states)


# --------------------------------------------------------------------------- reextract


def _asset_graph() -> BaseAssetGraph:
    """The code location's asset graph (the CLI is an entry point: it may load the definitions)."""
    from lumikb_pipeline.definitions import defs

    return defs.resolve_asset_graph()


@app.command("reextract")
@handle_errors
def reextract(
    slug: Annotated[str, typer.Argument(help="The KB to re-extract.")],
    mode: Annotated[WriteMode, typer.Option(help="replace: the document's graph becomes the new extraction; "
                                                  "merge: add to it.")] = WriteMode.REPLACE,
    outdated: Annotated[
        bool, typer.Option("--outdated", help="Documents older than the KB's schema (the default).")
    ] = False,
    all_: Annotated[bool, typer.Option("--all", help="Every live document of the KB.")] = False,
    doc: Annotated[list[str] | None, typer.Option(
        "--doc", help="A document id or partition key, e.g. legal/nda-3f9c2a1b (repeatable).", metavar="ID")] = None,
    max_cost: Annotated[float | None, typer.Option("--max-cost", help="Stop the job when its spend reaches this "
                                                                     "many USD.", metavar="USD")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be re-extracted; start nothing.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends; exit 1 unless it succeeded.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the estimate as JSON.")] = False,
    idle_timeout: Annotated[float, typer.Option(
        "--idle-timeout", help="With --wait: give up after this many seconds without a Dagster daemon or a "
        "Celery worker to run the job (the job is kept).", metavar="SECONDS", min=1, max=86400)] = 60.0,
    strategy: Annotated[Strategy, typer.Option(
        help="auto: each document the cheapest correct way from the version it was extracted at (graph-only, "
             "delta or full); full: extract every chunk anew.")] = Strategy.AUTO,
) -> None:
    """Start a re-extraction job on the `reprocessing` queue and print its id."""
    from lumikb_pipeline.reextraction.service import Selection, start_reextraction

    chosen = [name for name, on in (("--outdated", outdated), ("--all", all_), ("--doc", bool(doc))) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} exclude each other; choose one of --outdated, --all, --doc ID")
    check_max_cost(max_cost)
    selection = Selection.of_ids(doc or []) if doc else Selection.all() if all_ else Selection.outdated()
    settings = ready_settings()
    if dry_run:
        _dry_run(settings, slug, selection, as_json, strategy.value)
        return
    if not _selected_count(settings, slug, selection):
        which = "outdated" if selection.kind == "outdated" else "selected"
        err_console.print(
            f"nothing to re-extract: no document of {slug} is {which}; no job was started",
            highlight=False,
        )
        return
    job = start_reextraction(
        settings, slug, selection, mode=mode, trigger="cli", max_cost=max_cost, asset_graph=_asset_graph(),
        strategy=strategy.value,
    )
    err_console.print(
        f"job {job.id}: {job.total_documents} document(s) of {slug} to schema version {job.target_schema_version} "
        f"({mode.value}), backfill {job.dagster_backfill_id or '-'}; follow it with `lumikb progress {job.id} --watch`",
        highlight=False,
    )
    echo(job.id)
    if wait:
        _wait(settings, job.id, idle_timeout)


def _selected_count(settings: Settings, slug: str, selection: Selection) -> int:
    from lumikb_pipeline.db.catalog import get_kb
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.reextraction.service import select_documents

    with session_scope(settings.effective_database_url) as session:
        return len(select_documents(session, get_kb(session, slug), selection))


def _dry_run(settings: Settings, slug: str, selection: Selection, as_json: bool, strategy: str = "auto") -> None:
    """Print what the job would do: documents, chunks, calls still needed, tokens and cost."""
    from lumikb_pipeline.db.catalog import current_schema, get_kb
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.reextraction.estimate import estimate_reextraction
    from lumikb_pipeline.reextraction.service import select_documents

    with session_scope(settings.effective_database_url) as session:
        kb = get_kb(session, slug)
        doc_ids = select_documents(session, kb, selection)
        estimate = estimate_reextraction(
            session, kb, current_schema(session, kb), kb.current_schema_version, settings.llm_model, doc_ids,
            "full" if strategy == "full" else "auto",
        )
    if as_json:
        echo(json.dumps(estimate.to_json()))
        return
    cost = "unknown (LiteLLM has no price for this model)" if estimate.estimated_cost_usd is None \
        else f"${estimate.estimated_cost_usd:.4f}"
    console.print(
        f"dry run, nothing was started: {estimate.documents} document(s) of {slug}, {estimate.chunks} chunk(s) "
        f"({estimate.cached_chunks} already checkpointed) to schema version {estimate.schema_version} with "
        f"{estimate.model}\n  LLM calls still needed: {estimate.llm_calls}\n"
        f"  estimated tokens: {estimate.estimated_prompt_tokens} in, {estimate.estimated_completion_tokens} out\n"
        f"  estimated cost: {cost}",
        highlight=False,
    )
    for group in estimate.by_strategy:
        group_cost = "unknown" if group.estimated_cost_usd is None else f"${group.estimated_cost_usd:.4f}"
        console.print(
            f"  {group.strategy}: {group.documents} document(s), {group.chunks} chunk(s), {group.llm_calls} LLM "
            f"call(s), {group.estimated_prompt_tokens} + {group.estimated_completion_tokens} tokens, {group_cost}",
            highlight=False, markup=False,
        )
    console.print(f"  completion tokens estimated from: {estimate.completion_model}", highlight=False, markup=False)


def missing_processes(settings: Settings, instance: DagsterInstance, heartbeat_max_age_s: float = 60.0) -> list[str]:
    """What a job needs that is not running: the Dagster daemon (no recent heartbeat) and Celery
    workers (none answers a ping on the broker)."""
    from celery import Celery

    from lumikb_pipeline.infra.redis_client import broker_url

    missing = []
    now = time.time()
    heartbeats = instance.get_daemon_heartbeats()
    if not any(now - beat.timestamp < heartbeat_max_age_s for beat in heartbeats.values()):
        missing.append("the Dagster daemon")
    url = broker_url(settings)
    probe = Celery(broker=url, backend=url)
    try:
        if not probe.control.ping(timeout=1.0):
            missing.append("a Celery worker")
    except Exception:  # an unreachable broker: no worker can take the job's steps either
        missing.append("a Celery worker (its broker does not answer)")
    finally:
        probe.close()
    return missing


def _wait(settings: Settings, job_id: str, idle_timeout: float = 60.0) -> None:
    from lumikb_pipeline.db.models import JobStatus
    from lumikb_pipeline.infra.dagster_instance import open_instance
    from lumikb_pipeline.reextraction.service import TERMINAL
    from lumikb_pipeline.reextraction.status import refresh_job_status

    instance = open_instance(settings)
    asset_graph = _asset_graph()
    last = None
    idle_since: float | None = None
    while True:
        job = refresh_job_status(settings, job_id, instance, asset_graph)
        if job.status != last:
            err_console.print(f"job {job_id}: {job.status.value}", highlight=False)
            last = job.status
        if job.status in TERMINAL:
            break
        # Without a daemon nothing launches the job's runs, without a worker nothing runs their steps:
        # say so after a bounded wait instead of printing "running" forever.
        missing = missing_processes(settings, instance)
        now = time.monotonic()
        idle_since = (idle_since or now) if missing else None
        if idle_since is not None and now - idle_since >= idle_timeout:
            raise LumikbError(
                f"job {job_id} is {job.status.value} but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not running (waited {idle_timeout:g} s); start them "
                f"with `lumikb up` and the job continues; follow it with `lumikb progress {job_id}`"
            )
        time.sleep(min(2.0, max(0.1, idle_timeout / 4)))
    if job.status != JobStatus.SUCCEEDED:
        detail = job.error or f"see `lumikb progress {job_id}`"
        raise LumikbError(f"job {job_id} ended {job.status.value}: {detail}")


# --------------------------------------------------------------------------- schedule


def _show(schedule: DriftSchedule) -> None:
    from datetime import UTC, datetime

    state = "enabled" if schedule.enabled else "disabled"
    upcoming = schedule.next_tick(datetime.now(UTC)).isoformat() if schedule.enabled else "-"
    console.print(f"drift check: '{schedule.cron}' (UTC), {state}, next {upcoming}", highlight=False)


@schedule_app.command("show")
@handle_errors
def schedule_show() -> None:
    """Show the drift check's cron and whether it is enabled."""
    from lumikb_pipeline.db.app_settings import read_drift_schedule
    from lumikb_pipeline.db.session import session_scope

    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        _show(read_drift_schedule(session))


@schedule_app.command("set-cron")
@handle_errors
def schedule_set_cron(
    cron: Annotated[str, typer.Argument(help="Five cron fields in UTC, e.g. '0 2 * * *'.", metavar="CRON")],
    webserver: Annotated[str | None, typer.Option(
        "--webserver", help="The Dagster webserver to reload the code location in (default: the configured one).",
        metavar="URL")] = None,
) -> None:
    """Change the drift check's cron: stored, then the code location is reloaded in the Dagster
    webserver so drift_check_schedule carries it (the daemon ticks on it within a minute)."""
    from lumikb_pipeline.db.app_settings import set_drift_cron
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.domain.cron import validate_cron
    from lumikb_pipeline.orchestration.schedule_control import reload_code_location, webserver_url

    validate_cron(cron)  # bad input is refused before touching the database
    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        _show(set_drift_cron(session, cron))
    outcome = reload_code_location(webserver or webserver_url(settings))
    if outcome.reloaded:
        console.print(f"{outcome.message}: drift_check_schedule now runs at the new cron", highlight=False)
    else:
        err_console.print(
            f"{outcome.message}; the new cron applies when the code location next loads "
            "(Reload in the UI's Deployment page, or a restart)", highlight=False, soft_wrap=True,
        )


@schedule_app.command("enable")
@handle_errors
def schedule_enable() -> None:
    """Turn the drift check on (starts drift_check_schedule)."""
    _set_enabled(True)


@schedule_app.command("disable")
@handle_errors
def schedule_disable() -> None:
    """Turn the drift check off (stops drift_check_schedule; its cron is kept)."""
    _set_enabled(False)


def _set_enabled(enabled: bool) -> None:
    """Store the switch (the schedule's default status when the code loads) and start or stop the
    schedule in the Dagster instance, where the daemon reads it."""
    from lumikb_pipeline.db.app_settings import set_drift_enabled
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.orchestration.schedule_control import set_schedule_running

    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        _show(set_drift_enabled(session, enabled))
    state = set_schedule_running(settings, enabled)
    console.print(f"drift_check_schedule is {state} in the Dagster instance at {settings.effective_dagster_home}",
                  highlight=False)
