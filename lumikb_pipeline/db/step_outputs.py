"""Step outputs in the app database: what one step of a Dagster run hands to the next.

`resources.StepOutputIOManager` stores here what Dagster's filesystem IO manager would put under
`DAGSTER_HOME/storage/<run id>/<step>/<output>`, so the steps of a run may run on different machines
with nothing shared but the databases. Rows are per run and short-lived: `delete_runs` removes a
run's rows once the run retention rule says so (`infra.run_retention.expired_step_output_runs`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, and_, delete, func, select
from sqlalchemy.orm import Session

from lumikb_pipeline.db.models import StepOutput, utcnow

# One output is a small hand-over (the outcome list of a batch: a few hundred bytes per document).
# Anything near this bound is a bug or a design that should pass a reference instead.
MAX_STEP_OUTPUT_BYTES = 16 * 1024 * 1024
_DELETE_BATCH = 500


@dataclass(frozen=True)
class StepOutputKey:
    """Which output: the run that made it, its step, the output's name and its mapping key ("" if
    the output is not dynamic)."""

    run_id: str
    step_key: str
    output_name: str
    mapping_key: str = ""

    def describe(self) -> str:
        mapped = f"[{self.mapping_key}]" if self.mapping_key else ""
        return f"output {self.output_name!r}{mapped} of step {self.step_key!r} of run {self.run_id}"


class StepOutputTooLarge(ValueError):
    """An output above `MAX_STEP_OUTPUT_BYTES`."""


def save(session: Session, key: StepOutputKey, payload: bytes) -> int:
    """Store (or replace: a retried step stores again) one output; returns its size in bytes."""
    if len(payload) > MAX_STEP_OUTPUT_BYTES:
        raise StepOutputTooLarge(
            f"the {key.describe()} is {len(payload):,} bytes, above the {MAX_STEP_OUTPUT_BYTES:,} bytes a step "
            "may hand to the next through the app database; hand over a reference (ids) instead of the data"
        )
    session.execute(delete(StepOutput).where(_matches(key)))
    session.add(StepOutput(
        run_id=key.run_id, step_key=key.step_key, output_name=key.output_name, mapping_key=key.mapping_key,
        payload=payload, size_bytes=len(payload), created_at=utcnow(),
    ))
    return len(payload)


def load(session: Session, key: StepOutputKey) -> bytes | None:
    """The stored output, or None if there is none (never stored, or deleted with its run)."""
    return session.scalar(select(StepOutput.payload).where(_matches(key)))


def stored_runs(session: Session) -> dict[str, datetime]:
    """Every run that has stored outputs, with the time of its newest one."""
    rows = session.execute(select(StepOutput.run_id, func.max(StepOutput.created_at)).group_by(StepOutput.run_id))
    return {run_id: _aware(newest) for run_id, newest in rows.tuples()}


def stored_size(session: Session) -> tuple[int, int]:
    """(outputs, bytes) stored now."""
    count, size = session.execute(select(func.count(), func.coalesce(func.sum(StepOutput.size_bytes), 0))).one()
    return int(count), int(size)


def delete_runs(session: Session, run_ids: Iterable[str]) -> int:
    """Delete every output of these runs; returns how many outputs were deleted."""
    ids = list(dict.fromkeys(run_ids))
    deleted = 0
    for start in range(0, len(ids), _DELETE_BATCH):
        batch = ids[start : start + _DELETE_BATCH]
        result = session.execute(delete(StepOutput).where(StepOutput.run_id.in_(batch)))
        deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted


def _matches(key: StepOutputKey) -> ColumnElement[bool]:
    return and_(
        StepOutput.run_id == key.run_id,
        StepOutput.step_key == key.step_key,
        StepOutput.output_name == key.output_name,
        StepOutput.mapping_key == key.mapping_key,
    )


def _aware(value: datetime | str) -> datetime:
    # func.max() bypasses the column's type on SQLite, which then hands back naive UTC text.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
