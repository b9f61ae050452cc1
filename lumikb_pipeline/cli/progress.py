"""`lumikb progress`, `lumikb cancel` and `lumikb drift`."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from lumikb_pipeline import redis_client
from lumikb_pipeline.cli.app import app, console, handle_errors
from lumikb_pipeline.cli.catalog import ready_settings
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.drift import drift_report
from lumikb_pipeline.progress import JobProgress, job_progress

FINISHED = {"succeeded", "failed", "cancelled"}


JOB_HELP = "The job id that `lumikb reextract` printed, or the id of a backfill launched in the Dagster UI."


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _rate(rate: float | None) -> str:
    return "measuring" if rate is None else f"{rate:.2f} docs/s"


def render_progress(progress: JobProgress) -> Table:
    """The human view of a job's progress: bar, rate, ETA, spend and recent errors."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), expand=True)
    bar.add_task(
        f"job {progress.job_id[:8]} [{progress.status}]",
        total=max(progress.total, 1),
        completed=progress.completed + progress.failed + progress.cancelled,
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_row(bar)
    grid.add_row(
        f"completed {progress.completed}  failed {progress.failed}  cancelled {progress.cancelled}  "
        f"remaining {progress.remaining}  rate {_rate(progress.rate_per_s)}  ETA {_duration(progress.eta_seconds)}  "
        f"spend ${progress.spend_usd:.4f}"
    )
    for error in progress.recent_errors:
        grid.add_row(f"[red]{error['at'][11:19]} {error['doc_id'][:8]}[/] {error['error'][:160]}")
    return grid


@app.command("progress")
@handle_errors
def progress(
    job_id: Annotated[str, typer.Argument(help=JOB_HELP, metavar="JOB")],
    watch: Annotated[bool, typer.Option("--watch", help="A live progress bar until the job ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the progress as one JSON object.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", min=0.2)] = 1.0,
) -> None:
    """A job's progress: completed, failed, remaining, rate, ETA and the last errors."""
    settings = ready_settings()
    client = redis_client.connect(settings)

    def read() -> JobProgress:
        with session_scope(settings.effective_database_url) as session:
            return job_progress(session, client, job_id)

    current = read()
    if as_json and not watch:
        typer.echo(json.dumps(current.contract_json()))
        return
    if not watch:
        console.print(render_progress(current))
        return
    with Live(render_progress(current), console=console, refresh_per_second=4) as live:
        while current.status not in FINISHED:
            time.sleep(interval)
            current = read()
            live.update(render_progress(current))
            if as_json:
                typer.echo(json.dumps(current.contract_json()))


@app.command("cancel")
@handle_errors
def cancel(
    job_id: Annotated[str, typer.Argument(help=JOB_HELP, metavar="JOB")],
) -> None:
    """Stop a job: no new LLM call after this returns; a document in flight is written whole or keeps
    its previous graph and is marked cancelled."""
    from lumikb_pipeline.cancellation import cancel_job

    report = cancel_job(ready_settings(), job_id)
    if report.already_finished:
        console.print(f"job {report.job_id} had already ended: {report.status}", highlight=False)
        return
    console.print(
        f"job {report.job_id}: cancel requested; {report.documents_cancelled} document(s) not started were cancelled, "
        f"{report.runs_cancelled} queued run(s) cancelled{', backfill stopped' if report.backfill_cancelled else ''}; "
        f"runs in flight stop at their next LLM call. Status: {report.status}",
        highlight=False,
    )


@app.command("drift")
@handle_errors
def drift(
    slug: Annotated[str | None, typer.Argument(help="One KB (default: every KB).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per KB.")] = False,
) -> None:
    """Outdated documents per KB: their latest successful extraction is older than the KB's schema."""
    settings = ready_settings()
    with session_scope(settings.effective_database_url) as session:
        report = drift_report(session, slug)
    if as_json:
        typer.echo(json.dumps([item.to_json() for item in report]))
        return
    table = Table("KB", "schema version", "documents", "outdated")
    for item in report:
        table.add_row(item.kb, str(item.schema_version), str(item.documents), str(item.outdated))
    console.print(table)
