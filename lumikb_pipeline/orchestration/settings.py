"""Deployment knobs of the orchestration (queues, workers, pools, run limits), from the environment.

They sit beside `lumikb_pipeline.config.Settings` (same `LUMIKB_` prefix, same error style) because
only the Dagster/Celery side reads them. An invalid value fails at start-up naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from functools import lru_cache

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lumikb_pipeline.errors import ConfigError


class OrchestrationSettings(BaseSettings):
    """Queue priorities, worker sizes, pool limits and time limits; see docs/operations.md."""

    model_config = SettingsConfigDict(env_prefix="LUMIKB_", extra="ignore")

    # Dagster run-queue priority (`dagster/priority`): higher runs are dequeued first.
    document_processing_priority: int = Field(default=10, ge=-100, le=100)
    reprocessing_priority: int = Field(default=0, ge=-100, le=100)
    # Celery worker processes per queue (`celery worker -c`).
    document_processing_concurrency: int = Field(default=2, ge=1, le=64)
    reprocessing_concurrency: int = Field(default=2, ge=1, le=64)
    # A worker child that grew past this (KiB) is replaced after its current task.
    worker_max_memory_kb: int = Field(default=1_500_000, ge=50_000)
    # Tasks a worker child runs before it is replaced (bounds slow leaks too).
    worker_max_tasks_per_child: int = Field(default=200, ge=1)
    # Dagster op-concurrency pools (instance-wide step slots).
    llm_pool_limit: int = Field(default=4, ge=1, le=1000)
    graph_write_pool_limit: int = Field(default=3, ge=1, le=1000)
    # Runs the queue may start beyond the free slots of their first pool, so they boot while they wait.
    pool_run_buffer: int = Field(default=2, ge=0, le=100)
    # Runs in progress at once, and how many of them may be re-extraction (backfill) runs.
    max_concurrent_runs: int = Field(default=12, ge=2, le=1000)
    max_reprocessing_runs: int = Field(default=2, ge=1, le=1000)
    # A re-extraction run still going after this is failed by run monitoring (then retried).
    reextraction_max_runtime_s: int = Field(default=7200, ge=60)
    # Any run still going after this is failed by run monitoring.
    run_max_runtime_s: int = Field(default=10800, ge=60)
    # Automatic retries of a failed run (from failure).
    run_max_retries: int = Field(default=2, ge=0, le=10)
    # Celery redelivers an unacknowledged task after this; it must exceed the longest step.
    celery_visibility_timeout_s: int = Field(default=14400, ge=60)
    # How often the sensors look (seconds).
    partitions_sensor_interval_s: int = Field(default=15, ge=1)
    schema_sensor_interval_s: int = Field(default=30, ge=1)
    job_status_sensor_interval_s: int = Field(default=15, ge=1)
    # Every this many seconds the partitions sensor also compares all partitions with the database.
    partitions_reconcile_s: int = Field(default=600, ge=10)
    # The Dagster storage database (`postgresql+psycopg2://...`; see `dagster_storage_url`); unset: SQLite files.
    dagster_pg_url: str | None = None
    # Where `lumikb up` serves the Dagster UI.
    webserver_host: str = "127.0.0.1"
    webserver_port: int = Field(default=3000, ge=1, le=65535)

    @model_validator(mode="after")
    def _check_limits(self) -> OrchestrationSettings:
        if self.max_reprocessing_runs >= self.max_concurrent_runs:
            raise ValueError(
                "LUMIKB_MAX_REPROCESSING_RUNS must be below LUMIKB_MAX_CONCURRENT_RUNS, "
                "or re-extraction runs could take every run slot and delay normal processing"
            )
        if self.max_reprocessing_runs >= min(self.llm_pool_limit, self.graph_write_pool_limit):
            raise ValueError(
                "LUMIKB_MAX_REPROCESSING_RUNS must be below LUMIKB_LLM_POOL_LIMIT and LUMIKB_GRAPH_WRITE_POOL_LIMIT, "
                "or re-extraction runs could hold every slot of a pool and delay normal processing"
            )
        if self.celery_visibility_timeout_s <= self.reextraction_max_runtime_s:
            raise ValueError(
                "LUMIKB_CELERY_VISIBILITY_TIMEOUT_S must exceed LUMIKB_REEXTRACTION_MAX_RUNTIME_S, "
                "or Celery redelivers a step that is still running"
            )
        return self


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        variable = f"LUMIKB_{field.upper()}" if field else "configuration"
        lines.append(f"{variable}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_orchestration_settings() -> OrchestrationSettings:
    """Read the environment now; raise ConfigError naming each invalid variable."""
    try:
        return OrchestrationSettings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_orchestration_settings() -> OrchestrationSettings:
    """The process-wide orchestration settings, read once."""
    return load_orchestration_settings()


DAGSTER_PG_URL_VARIABLE = "LUMIKB_DAGSTER_PG_URL"


def dagster_storage_url(url: str) -> str:
    """The Dagster storage URL with its driver pinned to psycopg2.

    dagster-postgres runs `NOTIFY run_events, %(notify_id)s` on every event; psycopg 3 binds
    parameters on the server, where NOTIFY takes none, so every event write fails. SQLAlchemy 2.1
    picks psycopg 3 for a bare `postgresql://` URL, hence the explicit driver.
    """
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def pin_dagster_storage_driver(environ: MutableMapping[str, str] | None = None) -> None:
    """Rewrite `LUMIKB_DAGSTER_PG_URL` in `environ` (default: this process) with `dagster_storage_url`,
    before any Dagster instance of this process or its children reads it."""
    env = os.environ if environ is None else environ
    value = env.get(DAGSTER_PG_URL_VARIABLE)
    if value:
        env[DAGSTER_PG_URL_VARIABLE] = dagster_storage_url(value)
