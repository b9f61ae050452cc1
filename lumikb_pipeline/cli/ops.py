"""`lumikb up|down|status`, `lumikb reextract` and `lumikb schedule …`: running the pipeline."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from lumikb_pipeline.cli.app import app, console, err_console, handle_errors, schedule_app
from lumikb_pipeline.cli.catalog import ready_settings
from lumikb_pipeline.errors import LumikbError, UsageError

if TYPE_CHECKING:
    from lumikb_pipeline.config import Settings
    from lumikb_pipeline.orchestration.jobs import Selection


class Mode(StrEnum):
    REPLACE = "replace"
    MERGE = "merge"


# --------------------------------------------------------------------------- up / down / status


@app.command("up")
@handle_errors
def up(
    detach: Annotated[bool, typer.Option("--detach", help="Start in the background and return.")] = False,
) -> None:
    """Start the Dagster code server, webserver and daemon, and one Celery worker per queue."""
    from lumikb_pipeline.orchestration import processes
    from lumikb_pipeline.orchestration.settings import load_orchestration_settings

    settings = ready_settings()
    orchestration = load_orchestration_settings()
    processes.prepare_instance(settings, orchestration)
    workspace = processes.write_workspace(settings)
    specs = processes.service_specs(settings, orchestration, workspace)
    env = processes.service_env(settings, orchestration)
    try:
        started = processes.start_services(settings, specs, env)
    except (RuntimeError, TimeoutError) as exc:
        processes.stop_services(settings, [spec.name for spec in specs])
        raise LumikbError(f"{exc}; see the logs in {processes.logs_dir(settings)}") from None
    _print_states(settings)
    console.print(
        f"Dagster UI: http://{orchestration.webserver_host}:{orchestration.webserver_port}  "
        f"logs: {processes.logs_dir(settings)}", highlight=False,
    )
    if detach or not started:
        return
    console.print("running; Ctrl-C stops everything", highlight=False)
    try:
        while all(process.poll() is None for process in started.values()):
            time.sleep(1)
        dead = [name for name, process in started.items() if process.poll() is not None]
        err_console.print(f"[red]{', '.join(dead)} stopped; stopping the rest[/]", highlight=False)
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


def _print_states(settings: object) -> bool:
    from lumikb_pipeline.config import Settings
    from lumikb_pipeline.orchestration import processes

    assert isinstance(settings, Settings)
    table = Table("process", "state", "pid", "log")
    states = processes.service_states(settings, processes.service_names())
    for state in states:
        table.add_row(state.name, "[green]running[/]" if state.running else "[red]stopped[/]",
                      str(state.pid or "-"), str(state.log))
    console.print(table)
    return all(state.running for state in states)


# --------------------------------------------------------------------------- reextract


@app.command("reextract")
@handle_errors
def reextract(
    slug: Annotated[str, typer.Argument(help="The KB to re-extract.")],
    mode: Annotated[Mode, typer.Option(help="replace: the document's graph becomes the new extraction; "
                                             "merge: add to it.")] = Mode.REPLACE,
    outdated: Annotated[
        bool, typer.Option("--outdated", help="Documents older than the KB's schema (the default).")
    ] = False,
    all_: Annotated[bool, typer.Option("--all", help="Every live document of the KB.")] = False,
    doc: Annotated[list[str] | None, typer.Option("--doc", help="A document id (repeatable).", metavar="ID")] = None,
    max_cost: Annotated[float | None, typer.Option("--max-cost", help="Stop the job when its spend reaches this "
                                                                     "many USD.", metavar="USD")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be re-extracted; start nothing.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends; exit 1 unless it succeeded.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the estimate as JSON.")] = False,
) -> None:
    """Start a re-extraction job on the `reprocessing` queue and print its id."""
    from lumikb_pipeline.orchestration.jobs import Selection, start_reextraction

    chosen = [name for name, on in (("--outdated", outdated), ("--all", all_), ("--doc", bool(doc))) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} exclude each other; choose one of --outdated, --all, --doc ID")
    if max_cost is not None and max_cost < 0:
        raise UsageError(f"--max-cost {max_cost:g} is negative; give a budget in USD, e.g. --max-cost 5")
    selection = Selection.of_ids(doc or []) if doc else Selection.all() if all_ else Selection.outdated()
    settings = ready_settings()
    if dry_run:
        _dry_run(settings, slug, selection, as_json)
        return
    if not _selected_count(settings, slug, selection):
        which = "outdated" if selection.kind == "outdated" else "selected"
        err_console.print(
            f"nothing to re-extract: no document of {slug} is {which}; no job was started",
            highlight=False,
        )
        return
    job = start_reextraction(settings, slug, selection, mode=mode.value, trigger="cli", max_cost=max_cost)
    err_console.print(
        f"job {job.id}: {job.total_documents} document(s) of {slug} to schema version {job.target_schema_version} "
        f"({mode.value}), backfill {job.dagster_backfill_id or '-'}; follow it with `lumikb progress {job.id} --watch`",
        highlight=False,
    )
    typer.echo(job.id)
    if wait:
        _wait(settings, job.id)


def _selected_count(settings: Settings, slug: str, selection: Selection) -> int:
    from lumikb_pipeline.catalog import get_kb
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.orchestration.jobs import select_documents

    with session_scope(settings.effective_database_url) as session:
        return len(select_documents(session, get_kb(session, slug), selection))


def _dry_run(settings: Settings, slug: str, selection: Selection, as_json: bool) -> None:
    """Print what the job would do: documents, chunks, calls still needed, tokens and cost."""
    from lumikb_pipeline.catalog import current_schema, get_kb
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.estimate import estimate_reextraction
    from lumikb_pipeline.orchestration.jobs import select_documents

    with session_scope(settings.effective_database_url) as session:
        kb = get_kb(session, slug)
        doc_ids = select_documents(session, kb, selection)
        estimate = estimate_reextraction(
            session, kb, current_schema(session, kb), kb.current_schema_version, settings.llm_model, doc_ids
        )
    if as_json:
        typer.echo(json.dumps(estimate.to_json()))
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


def _wait(settings: object, job_id: str) -> None:
    from lumikb_pipeline.config import Settings
    from lumikb_pipeline.db.models import JobStatus
    from lumikb_pipeline.orchestration.instance import open_instance
    from lumikb_pipeline.orchestration.jobs import TERMINAL, refresh_job_status

    assert isinstance(settings, Settings)
    instance = open_instance(settings)
    last = None
    while True:
        job = refresh_job_status(settings, job_id, instance)
        if job.status != last:
            err_console.print(f"job {job_id}: {job.status.value}", highlight=False)
            last = job.status
        if job.status in TERMINAL:
            break
        time.sleep(2)
    if job.status != JobStatus.SUCCEEDED:
        detail = job.error or f"see `lumikb progress {job_id}`"
        raise LumikbError(f"job {job_id} ended {job.status.value}: {detail}")


# --------------------------------------------------------------------------- schedule


def _show(schedule: object) -> None:
    from datetime import UTC, datetime

    from lumikb_pipeline.schedules.drift_schedule import DriftSchedule

    assert isinstance(schedule, DriftSchedule)
    state = "enabled" if schedule.enabled else "disabled"
    upcoming = schedule.next_tick(datetime.now(UTC)).isoformat() if schedule.enabled else "-"
    console.print(f"drift check: '{schedule.cron}' (UTC), {state}, next {upcoming}", highlight=False)


@schedule_app.command("show")
@handle_errors
def schedule_show() -> None:
    """Show the drift check's cron and whether it is enabled."""
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.schedules.drift_schedule import read_drift_schedule

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
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.orchestration.schedule_control import reload_code_location, webserver_url
    from lumikb_pipeline.schedules.drift_schedule import set_drift_cron, validate_cron

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
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.orchestration.schedule_control import set_schedule_running
    from lumikb_pipeline.schedules.drift_schedule import set_drift_enabled

    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        _show(set_drift_enabled(session, enabled))
    state = set_schedule_running(settings, enabled)
    console.print(f"drift_check_schedule is {state} in the Dagster instance at {settings.effective_dagster_home}",
                  highlight=False)
