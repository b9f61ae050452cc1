"""The Dagster instance: its configuration (`dagster.yaml`), opening it, and the pool limits.

`instance_config` is the single source of the instance configuration; the repository's
`dagster.yaml` is its production rendering (a test keeps the two equal), and `lumikb up` writes it
into `DAGSTER_HOME` when none is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lumikb_pipeline.config import Settings
from lumikb_pipeline.orchestration.names import POOL_GRAPH_WRITE, POOL_LLM, TAG_BACKFILL
from lumikb_pipeline.orchestration.settings import OrchestrationSettings

if TYPE_CHECKING:
    from dagster import DagsterInstance

INSTANCE_FILE = "dagster.yaml"


def instance_config(
    orchestration: OrchestrationSettings,
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
            "max_concurrent_runs": orchestration.max_concurrent_runs,
            # Every re-extraction (ours and the UI's) is a backfill: cap them below the total so
            # normal processing always finds a run slot.
            "tag_concurrency_limits": [{"key": TAG_BACKFILL, "limit": orchestration.max_reprocessing_runs}],
        },
        "pools": {
            "granularity": "op",
            # Pools without an explicit limit get this; `lumikb up` sets ours explicitly.
            "default_limit": min(orchestration.llm_pool_limit, orchestration.graph_write_pool_limit),
            "op_granularity_run_buffer": orchestration.pool_run_buffer,
        },
    }
    config["run_monitoring"] = {
        "enabled": True,
        "start_timeout_seconds": 300,
        "cancel_timeout_seconds": 180,
        "max_runtime_seconds": orchestration.run_max_runtime_s,
        "poll_interval_seconds": monitoring_poll_interval_s,
        # Slots still held by a run that ended (a crashed worker) are freed after this, or they
        # would block every later step of their pool.
        "free_slots_after_run_end_seconds": 30,
    }
    config["run_retries"] = {
        "enabled": True,
        "max_retries": orchestration.run_max_retries,
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
    header = (
        "# Dagster instance of lumikb_pipeline. Generated from lumikb_pipeline/orchestration/instance.py\n"
        "# (`instance_config`); change it there. Per-pool limits: LUMIKB_LLM_POOL_LIMIT and\n"
        "# LUMIKB_GRAPH_WRITE_POOL_LIMIT, applied by `lumikb up` (see docs/operations.md).\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def ensure_instance_config(settings: Settings, orchestration: OrchestrationSettings, overwrite: bool = False) -> Path:
    """Write `dagster.yaml` into the Dagster home unless one is there; return the home."""
    home = settings.effective_dagster_home
    home.mkdir(parents=True, exist_ok=True)
    path = home / INSTANCE_FILE
    if overwrite or not path.exists():
        config = instance_config(orchestration, postgres=bool(orchestration.dagster_pg_url))
        path.write_text(render_instance_yaml(config))
    return home


def open_instance(settings: Settings, orchestration: OrchestrationSettings | None = None) -> DagsterInstance:
    """The Dagster instance of this installation (its `dagster.yaml` written first if missing)."""
    from dagster import DagsterInstance

    from lumikb_pipeline.orchestration.settings import get_orchestration_settings, pin_dagster_storage_driver

    pin_dagster_storage_driver()
    home = ensure_instance_config(settings, orchestration or get_orchestration_settings())
    return DagsterInstance.from_config(str(home))


def apply_pool_limits(instance: Any, orchestration: OrchestrationSettings) -> dict[str, int]:
    """Set the LLM and graph-write pool limits on the instance (idempotent); returns them."""
    limits = {POOL_LLM: orchestration.llm_pool_limit, POOL_GRAPH_WRITE: orchestration.graph_write_pool_limit}
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)
    return limits
