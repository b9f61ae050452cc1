"""Closing the work of workers that died: ledger rows still `running` whose Dagster run group has
ended (the run and its retries), or whose lease expired, are marked failed with what happened, their
jobs' progress learns it, and the jobs they finish are closed. The job-status sensor runs it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import CLAIMANT_PREFIX, ROOT_RUN_TAG
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.tracking import progress

if TYPE_CHECKING:
    from dagster import DagsterInstance


# How long after the last run of a run group ended its claims count as abandoned: the run-retry
# daemon launches a retry (which takes the claims over) within a few seconds of a failure.
RUN_RETRY_GRACE_S = 60.0


def dagster_claimant_gone(
    instance: DagsterInstance, grace_s: float = RUN_RETRY_GRACE_S, now: float | None = None
) -> Callable[[str], bool | None]:
    """Whether the claimant of a ledger row is gone, for `ledger.reap_abandoned`: a claimant
    `dagster-run:ROOT` is gone once every run of that run group (the run and its retries) has
    finished more than `grace_s` ago; other claimants are unknown (None)."""
    from dagster import RunsFilter

    def gone(claimant: str) -> bool | None:
        if not claimant.startswith(CLAIMANT_PREFIX):
            return None
        root = claimant.removeprefix(CLAIMANT_PREFIX)
        records = [
            *instance.get_run_records(RunsFilter(run_ids=[root])),
            *instance.get_run_records(RunsFilter(tags={ROOT_RUN_TAG: root})),
        ]
        if not records:
            return True
        if any(not record.dagster_run.is_finished for record in records):
            return False
        last = max((record.end_time or record.update_timestamp.timestamp()) for record in records)
        return (now if now is not None else time.time()) - last > grace_s

    return gone


def reap_abandoned_work(
    settings: Settings, instance: DagsterInstance, grace_s: float = RUN_RETRY_GRACE_S
) -> list[str]:
    """Close the ledger rows whose claimant is gone (`ledger.reap_abandoned`, with the Dagster run
    groups as claimants), report them to their jobs' progress and close the jobs they finish.
    Returns one line per job touched."""
    with session_scope(settings.effective_database_url) as session:
        reaped = ledger.reap_abandoned(session, dagster_claimant_gone(instance, grace_s))
        by_job: dict[str, list[tuple[str, str, float, str | None]]] = {}
        for row in reaped:
            if row.job_id is not None:
                by_job.setdefault(row.job_id, []).append((row.document_id, "failed", row.cost_usd, row.last_error))
    lines = []
    for job_id, outcomes in by_job.items():
        progress.report(redis_client.connect(settings), job_id, outcomes)
        with session_scope(settings.effective_database_url) as session:
            closed = ledger.finish_job_if_done(session, job_id)
        lines.append(
            f"job {job_id}: {len(outcomes)} abandoned document(s) marked failed"
            + (f", job {closed.value}" if closed is not None else "")
        )
    if reaped and not by_job:
        lines.append(f"{len(reaped)} abandoned document(s) of no job marked failed")
    return lines
