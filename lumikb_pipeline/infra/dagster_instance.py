"""The Dagster instance: its configuration (`dagster.yaml`), opening it, and the pool limits.

`instance_config` is the single source of the instance configuration. The repository has two
renderings of it, kept equal to it by a test: `dagster.yaml` at the root, on Dagster's own SQLite
storage, so that `dagster dev` and `dagster definitions validate` work from a clone with no variable
set; and `docker/dagster.yaml`, the production one, on PostgreSQL from `LUMIKB_DAGSTER_PG_URL`.
`lumikb up` writes the rendering its settings call for into `DAGSTER_HOME` when none is there.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import DOCUMENTS_PARTITIONS, POOL_GRAPH_WRITE, POOL_LLM, TAG_BACKFILL

if TYPE_CHECKING:
    from dagster import DagsterInstance

INSTANCE_FILE = "dagster.yaml"


def instance_config(
    settings: Settings,
    *,
    postgres: bool = True,
    dequeue_interval_s: int = 2,
    monitoring_poll_interval_s: int = 15,
) -> dict[str, Any]:
    """The instance configuration: PostgreSQL storage (else Dagster's SQLite files), the queued
    run coordinator with run limits that keep re-extraction from taking every run slot, pools,
    run monitoring (run time limits, slots freed after crashed runs) and run retries."""
    config: dict[str, Any] = {}
    if postgres:
        config["storage"] = {"postgres": {"postgres_url": {"env": "LUMIKB_DAGSTER_PG_URL"}}}
    config["run_coordinator"] = {
        "module": "dagster._core.run_coordinator",
        "class": "QueuedRunCoordinator",
        "config": {
            "dequeue_interval_seconds": dequeue_interval_s,
            # Launch dequeued runs side by side: a launch waits until the run's process has loaded
            # the code (seconds), so one at a time starts a batch of runs seconds apart.
            "dequeue_use_threads": True,
            "dequeue_num_workers": 4,
        },
    }
    config["concurrency"] = {
        "runs": {
            "max_concurrent_runs": settings.max_concurrent_runs,
            # Every re-extraction (ours and the UI's) is a backfill: cap them below the total so
            # normal processing always finds a run slot.
            "tag_concurrency_limits": [{"key": TAG_BACKFILL, "limit": settings.max_reprocessing_runs}],
        },
        "pools": {
            "granularity": "op",
            # Pools without an explicit limit get this; `lumikb up` sets ours explicitly.
            "default_limit": min(settings.llm_pool_limit, settings.graph_write_pool_limit),
            "op_granularity_run_buffer": settings.pool_run_buffer,
        },
    }
    config["run_monitoring"] = {
        "enabled": True,
        "start_timeout_seconds": 300,
        "cancel_timeout_seconds": 180,
        "max_runtime_seconds": settings.run_max_runtime_s,
        "poll_interval_seconds": monitoring_poll_interval_s,
        # Slots still held by a run that ended (a crashed worker) are freed after this, or they
        # would block every later step of their pool.
        "free_slots_after_run_end_seconds": 30,
    }
    config["run_retries"] = {
        "enabled": True,
        "max_retries": settings.run_max_retries,
        "retry_on_asset_or_op_failure": True,
    }
    config["sensors"] = {"use_threads": True, "num_workers": 4}
    config["schedules"] = {"use_threads": True, "num_workers": 2}
    config["backfills"] = {"use_threads": True, "num_workers": 2, "num_submit_workers": 2}
    config["telemetry"] = {"enabled": False}
    # No "Join the Dagster community" dialog over the admin's console (nor over its screenshots).
    config["nux"] = {"enabled": False}
    return config


def render_instance_yaml(config: dict[str, Any]) -> str:
    """`dagster.yaml` text for a configuration."""
    storage = (
        "# Storage: PostgreSQL from LUMIKB_DAGSTER_PG_URL (production; docker/dagster.yaml).\n"
        if "storage" in config else
        "# Storage: Dagster's SQLite files under DAGSTER_HOME (the embedded defaults: `dagster dev` from the\n"
        "# repository root works with no variable set). Production uses docker/dagster.yaml.\n"
    )
    header = (
        "# Dagster instance of lumikb_pipeline. Generated from lumikb_pipeline/infra/dagster_instance.py\n"
        "# (`instance_config`); change it there. Per-pool limits: LUMIKB_LLM_POOL_LIMIT and\n"
        "# LUMIKB_GRAPH_WRITE_POOL_LIMIT, applied by `lumikb up` (see docs/operations.md).\n"
    )
    return header + storage + yaml.safe_dump(config, sort_keys=False)


def ensure_instance_config(settings: Settings, overwrite: bool = False) -> Path:
    """Write `dagster.yaml` into the Dagster home unless one is there; return the home."""
    home = settings.effective_dagster_home
    home.mkdir(parents=True, exist_ok=True)
    path = home / INSTANCE_FILE
    if overwrite or not path.exists():
        config = instance_config(settings, postgres=bool(settings.dagster_pg_url))
        path.write_text(render_instance_yaml(config))
    return home


def open_instance(settings: Settings) -> DagsterInstance:
    """The Dagster instance of this installation (its `dagster.yaml` written first if missing)."""
    from dagster import DagsterInstance


    pin_dagster_storage_driver()
    home = ensure_instance_config(settings)
    return DagsterInstance.from_config(str(home))


def add_missing_partitions(instance: DagsterInstance, partition_keys: Sequence[str]) -> list[str]:
    """Add the `documents` partitions (documents' `partition_key`s) that the instance does not have
    yet; returns them."""
    if not partition_keys:
        return []
    existing = instance.get_existing_dynamic_partitions(DOCUMENTS_PARTITIONS, list(partition_keys))
    missing = [key for key in partition_keys if key not in existing]
    if missing:
        instance.add_dynamic_partitions(DOCUMENTS_PARTITIONS, missing)
    return missing


def apply_pool_limits(instance: Any, settings: Settings) -> dict[str, int]:
    """Set the LLM and graph-write pool limits on the instance (idempotent); returns them."""
    limits = {POOL_LLM: settings.llm_pool_limit, POOL_GRAPH_WRITE: settings.graph_write_pool_limit}
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)
    return limits


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
