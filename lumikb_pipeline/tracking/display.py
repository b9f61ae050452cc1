"""How a job's progress looks in a terminal (`lumikb progress --watch`, the demo)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from lumikb_pipeline.tracking.progress import JobProgress


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
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), expand=True)
    bar.add_task(
        f"job {progress.job_id[:8]} [{progress.status}]",
        total=max(progress.total, 1),
        completed=progress.completed + progress.failed + progress.cancelled,
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_row(bar)
    grid.add_row(Text(
        f"completed {progress.completed}  failed {progress.failed}  cancelled {progress.cancelled}  "
        f"remaining {progress.remaining}  rate {_rate(progress.rate_per_s)}  ETA {_duration(progress.eta_seconds)}  "
        f"spend ${progress.spend_usd:.4f}"
    ))
    for error in progress.recent_errors:
        grid.add_row(Text.assemble((f"{error['at'][11:19]} {error['doc_id'][:8]}", "red"), " ", error["error"][:160]))
    return grid
