"""Stopping a job: cancellation and the spending budget, checked before every LLM call.

The extractor asks `should_stop()` right before each call, on its event loop, so the answer comes
from a value refreshed at most every `refresh_s` from Redis (the cancel flag and the job's live
spend, which every worker adds to as calls finish). The app database stays the truth: the cancel
flag is also `jobs.cancel_requested_at`, and a live-spend counter lost from Redis is re-seeded
from the ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import redis
from sqlalchemy import func, select

from lumikb_pipeline.core.names import JOB_KEY_TTL_S
from lumikb_pipeline.db.models import ExtractionRecord, Job
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure


def cancel_key(job_id: str) -> str:
    return f"lumikb:job:{job_id}:cancel"


def spend_key(job_id: str) -> str:
    return f"lumikb:job:{job_id}:spend_live"


def flag_cancelled(client: redis.Redis, job_id: str) -> None:
    """Tell every worker of a job to start no new LLM call."""
    client.set(cancel_key(job_id), "1", ex=JOB_KEY_TTL_S)


@dataclass
class JobControl:
    """One worker's view of a job's stop conditions."""

    client: redis.Redis
    database_url: str
    job_id: str
    max_cost_usd: float | None
    refresh_s: float = 0.5
    _checked_at: float = 0.0
    _stop_reason: str | None = None
    _spent: float = 0.0

    @classmethod
    def for_job(cls, client: redis.Redis, database_url: str, job_id: str) -> JobControl:
        with session_scope(database_url) as session:
            job = session.get(Job, job_id)
            budget = job.max_cost_usd if job is not None else None
            cancelled = job is not None and job.cancel_requested_at is not None
        control = cls(client, database_url, job_id, budget)
        if cancelled:
            control._stop_reason = "cancelled"
        control.should_stop()  # the first read opens the connection: here, not on the extractor's event loop
        return control

    @property
    def stop_reason(self) -> str | None:
        """`cancelled`, `budget` or None."""
        return self._stop_reason

    def should_stop(self) -> bool:
        """True once the job is cancelled or its spend has reached its budget."""
        if self._stop_reason is not None:
            return True
        now = time.monotonic()
        if now - self._checked_at < self.refresh_s:
            return False
        self._checked_at = now
        try:
            flag, spent = cast(list[str | None], self.client.mget(cancel_key(self.job_id), spend_key(self.job_id)))
        except redis.RedisError:
            return False  # the ledger-side checks (between documents) still apply
        if flag:
            self._stop_reason = "cancelled"
        elif self.max_cost_usd is not None:
            self._spent = float(spent) if spent is not None else self._seed_spend()
            if self._spent >= self.max_cost_usd:
                self._stop_reason = "budget"
        return self._stop_reason is not None

    def on_result(self, outcome: ChunkExtraction | ChunkFailure) -> None:
        """Add a finished call's cost to the job's live spend (shared by all workers)."""
        cost = outcome.cost_usd if isinstance(outcome, ChunkExtraction) else 0.0
        if cost <= 0:
            return
        try:
            pipe = self.client.pipeline()
            pipe.incrbyfloat(spend_key(self.job_id), cost)
            pipe.expire(spend_key(self.job_id), JOB_KEY_TTL_S)
            self._spent = float(pipe.execute()[0])
        except redis.RedisError:
            return
        if self.max_cost_usd is not None and self._spent >= self.max_cost_usd:
            self._stop_reason = "budget"

    def _seed_spend(self) -> float:
        with session_scope(self.database_url) as session:
            spent = session.scalar(
                select(func.coalesce(func.sum(ExtractionRecord.cost_usd), 0.0)).where(
                    ExtractionRecord.job_id == self.job_id
                )
            )
        value = float(spent or 0.0)
        self.client.set(spend_key(self.job_id), value, ex=JOB_KEY_TTL_S, nx=True)
        return value
