"""Configuration from the environment (PRODUCT.md section 4), with embedded defaults.

Every setting is read once into a typed `Settings`; an invalid value fails at start-up with a
message naming the variable. Everything derived from a default (the SQLite file, the embedded Redis,
the Dagster home) is resolved here and nowhere else.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lumikb_pipeline.core.errors import ConfigError
from lumikb_pipeline.core.names import OFFLINE_MODEL

_RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_RATE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|m|min|h)\s*$")


@dataclass(frozen=True)
class RateLimit:
    """A number of calls per period, e.g. `10/s` or `600/m`."""

    calls: float
    period_s: float

    @property
    def per_second(self) -> float:
        return self.calls / self.period_s

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.period_s]
        calls = int(self.calls) if self.calls == int(self.calls) else self.calls
        return f"{calls}/{unit}"


# The limit of the offline model unless `LUMIKB_LLM_RATE_LIMITS` names it (`Settings.rate_limit_for`).
OFFLINE_RATE_LIMIT = RateLimit(1000.0, 1.0)


def parse_rate_limit(text: str) -> RateLimit:
    """Parse `N/s`, `N/m` or `N/h` (N > 0); raise ValueError with the accepted forms otherwise."""
    match = _RATE_PATTERN.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a rate; write calls per period, e.g. '10/s', '600/m' or '36000/h'")
    return RateLimit(float(match.group(1)), _RATE_UNITS[match.group(2)])


def parse_model_rate_limits(text: str) -> dict[str, RateLimit]:
    """Parse `model=rate,model=rate` (per-model overrides of the global limit)."""
    limits: dict[str, RateLimit] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, sep, rate = part.rpartition("=")
        if not sep or not model.strip():
            raise ValueError(f"{part!r} is not 'model=rate'; e.g. 'openai/gpt-4o-mini=20/s,lumikb/offline=100/s'")
        limits[model.strip()] = parse_rate_limit(rate)
    return limits


class Settings(BaseSettings):
    """All of the pipeline's configuration; see PRODUCT.md section 4 and docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="LUMIKB_", extra="ignore", populate_by_name=True)

    home: Path = Path("./.lumikb")
    database_url: str | None = None
    redis_url: str | None = None
    neo4j_uri: str | None = None
    neo4j_user: str = "neo4j"
    neo4j_password: SecretStr | None = None
    neo4j_database: str = "neo4j"
    llm_model: str = "lumikb/offline"
    llm_api_base: str | None = None
    llm_api_key: SecretStr | None = None
    llm_rate_limit: str = "10/s"
    llm_rate_limits: str = ""
    llm_max_in_flight: int | None = Field(default=None, gt=0, le=10_000)
    llm_timeout_s: float = Field(default=120.0, gt=0)
    llm_max_attempts: int = Field(default=6, ge=1, le=50)
    # A provider outage (5xx, 429, timeouts, connection errors) is waited out: a chunk fails on
    # them only once they have gone on this long and its attempts are spent (llm/retry.py).
    llm_retry_window_s: float = Field(default=600.0, ge=0, le=86_400)
    chunk_tokens: int = Field(default=400, ge=32, le=8192)
    # Documents per Dagster run (re-extraction backfills and normal processing). Each run costs a
    # process of its own (seconds of CPU) that its documents share: with the offline model, runs of
    # 100 cost about 50 ms a document of orchestration, runs of 40 about 80 (docs/benchmarks.md,
    # "Orchestration overhead"). A re-extraction's calls do not depend on it (`pipeline.ahead`).
    reextract_batch_size: int = Field(default=100, ge=1, le=10_000)
    # Seconds a re-extraction step may extract its job's later documents ahead while the next run
    # starts (`pipeline.ahead`); 0 turns extraction ahead off.
    reextract_ahead_s: float = Field(default=120.0, ge=0, le=3600)
    drift_threshold: int = Field(default=10, ge=0)
    drift_webhook_url: str | None = None
    celery_broker_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CELERY_BROKER_URL", "celery_broker_url")
    )
    dagster_home: Path | None = Field(
        default=None, validation_alias=AliasChoices("DAGSTER_HOME", "dagster_home")
    )

    # --- the orchestration: queues, workers, pools, run limits (docs/operations.md) ---
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
    # Worker processes a queue's worker keeps when its queue is empty (`celery worker --autoscale
    # <concurrency>,<min>`): unset, every worker keeps its full `-c` pool; 0 to 63, the pool grows to
    # the queue's concurrency while steps wait and shrinks back to this after 30 s without work.
    worker_autoscale_min: int | None = Field(default=None, ge=0, le=63)
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

    @field_validator("home")
    @classmethod
    def _check_home(cls, value: Path) -> Path:
        path = value.expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{str(value)!r} exists and is not a folder; point it at a folder (created if missing)")
        return value

    @field_validator("llm_rate_limit")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        parse_rate_limit(value)
        return value

    @field_validator("llm_rate_limits")
    @classmethod
    def _check_rates(cls, value: str) -> str:
        parse_model_rate_limits(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError("not a SQLAlchemy URL; e.g. postgresql+psycopg://user:pw@host:5432/db") from exc
        if url.get_backend_name() not in ("postgresql", "sqlite"):
            raise ValueError(f"backend {url.get_backend_name()!r} is not supported; use postgresql or sqlite")
        return value

    @field_validator("redis_url", "celery_broker_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://", "redis+socket://")):
            raise ValueError("must be a redis:// (or rediss://, unix://) URL, e.g. redis://127.0.0.1:6379/0")
        return value

    @field_validator("neo4j_uri")
    @classmethod
    def _check_neo4j_uri(cls, value: str | None) -> str | None:
        schemes = ("bolt://", "bolt+s://", "bolt+ssc://", "neo4j://", "neo4j+s://", "neo4j+ssc://")
        if value is not None and not value.startswith(schemes):
            raise ValueError("must be a bolt:// or neo4j:// URI, e.g. bolt://127.0.0.1:7687")
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
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
        if self.worker_autoscale_min is not None and self.worker_autoscale_min >= min(
            self.document_processing_concurrency, self.reprocessing_concurrency
        ):
            raise ValueError(
                "LUMIKB_WORKER_AUTOSCALE_MIN must be below LUMIKB_DOCUMENT_PROCESSING_CONCURRENCY and "
                "LUMIKB_REPROCESSING_CONCURRENCY (the pools grow up to those); unset it to keep full pools"
            )
        if self.celery_visibility_timeout_s <= self.reextraction_max_runtime_s:
            raise ValueError(
                "LUMIKB_CELERY_VISIBILITY_TIMEOUT_S must exceed LUMIKB_REEXTRACTION_MAX_RUNTIME_S, "
                "or Celery redelivers a step that is still running"
            )
        return self

    # --- derived values: the one place where embedded defaults are resolved ---

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_dir / 'lumikb.sqlite3'}"

    @property
    def uses_embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def uses_embedded_graph(self) -> bool:
        return self.neo4j_uri is None

    @property
    def effective_dagster_home(self) -> Path:
        return (self.dagster_home or self.home_dir / "dagster").expanduser().resolve()

    @property
    def rate_limit(self) -> RateLimit:
        """The global LLM limit for the configured model (see `rate_limit_for`)."""
        return self.rate_limit_for(self.llm_model)

    def rate_limit_for(self, model: str) -> RateLimit:
        """The global LLM limit for `model`: its `LUMIKB_LLM_RATE_LIMITS` entry, else `OFFLINE_RATE_LIMIT`
        for the offline model (it runs in-process and protects no paid API, so the demo is not slowed
        to 10 chunks/s), else `LUMIKB_LLM_RATE_LIMIT`."""
        overrides = parse_model_rate_limits(self.llm_rate_limits)
        if model in overrides:
            return overrides[model]
        if model == OFFLINE_MODEL:
            return OFFLINE_RATE_LIMIT
        return parse_rate_limit(self.llm_rate_limit)

    @property
    def max_in_flight(self) -> int:
        """Calls in flight across all workers: enough to keep the limit busy with ~5 s calls."""
        if self.llm_max_in_flight is not None:
            return self.llm_max_in_flight
        return max(1, min(500, math.ceil(self.rate_limit.per_second * 5)))


def make_private_dir(path: Path) -> Path:
    """Create `path` (and its parents) if missing; a folder this creates is private (0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def make_private_file(path: Path) -> Path:
    """Create the empty file `path` as private (0600) if it is missing, in a private folder. SQLite
    gives its journal and WAL files the mode of the database file, so those stay private too."""
    make_private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return path


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        variable = {"celery_broker_url": "CELERY_BROKER_URL", "dagster_home": "DAGSTER_HOME"}.get(
            field, field if field.isupper() else f"LUMIKB_{field.upper()}"
        )
        lines.append(f"{variable}: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings() -> Settings:
    """Read the environment now; raise ConfigError naming each invalid variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
