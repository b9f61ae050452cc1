"""The Dagster instance configuration: the repository's dagster.yaml is the generated one, it is a
valid instance configuration, and it holds the limits the product relies on."""

from pathlib import Path

import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config_schema

from lumikb_pipeline.core.config import Settings, load_settings
from lumikb_pipeline.core.errors import ConfigError
from lumikb_pipeline.infra.dagster_instance import (
    dagster_storage_url,
    instance_config,
    pin_dagster_storage_driver,
    render_instance_yaml,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch) -> Settings:
    import os

    for name in list(os.environ):
        if name.startswith("LUMIKB_"):
            monkeypatch.delenv(name)
    return Settings()


def test_the_repository_dagster_yamls_are_the_generated_embedded_and_production_configs(defaults: Settings) -> None:
    regenerate = "stale: regenerate it from lumikb_pipeline/infra/dagster_instance.py"
    embedded = render_instance_yaml(instance_config(defaults, postgres=False))
    assert (ROOT / "dagster.yaml").read_text() == embedded, f"dagster.yaml is {regenerate}"
    production = render_instance_yaml(instance_config(defaults))
    assert (ROOT / "docker" / "dagster.yaml").read_text() == production, f"docker/dagster.yaml is {regenerate}"
    assert "env:" not in embedded, "the repository's own dagster.yaml must work with no variable set"


def test_it_is_a_valid_instance_configuration(defaults: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMIKB_DAGSTER_PG_URL", "postgresql+psycopg2://user:pw@host:5432/dagster")
    config = yaml.safe_load(render_instance_yaml(instance_config(defaults)))
    result = process_config(dagster_instance_config_schema(), config)
    assert result.success, result.errors


def test_it_keeps_reextraction_below_the_run_limit_and_frees_slots_of_crashed_runs(
    defaults: Settings,
) -> None:
    config = instance_config(defaults)
    runs = config["concurrency"]["runs"]
    [limit] = runs["tag_concurrency_limits"]
    assert limit["key"] == "dagster/backfill" and limit["limit"] < runs["max_concurrent_runs"]
    assert limit["limit"] < min(defaults.llm_pool_limit, defaults.graph_write_pool_limit)
    assert config["concurrency"]["pools"]["granularity"] == "op"
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": True}
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "LUMIKB_DAGSTER_PG_URL"}}}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_without_postgres_the_instance_uses_dagsters_files(defaults: Settings) -> None:
    assert "storage" not in instance_config(defaults, postgres=False)


def test_the_storage_url_is_pinned_to_psycopg2() -> None:
    assert dagster_storage_url("postgresql://u:p@h:5432/d") == "postgresql+psycopg2://u:p@h:5432/d"
    assert dagster_storage_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert dagster_storage_url("postgresql+psycopg2://u@h/d") == "postgresql+psycopg2://u@h/d"
    env = {"LUMIKB_DAGSTER_PG_URL": "postgres://u@h/d"}
    pin_dagster_storage_driver(env)
    assert env["LUMIKB_DAGSTER_PG_URL"] == "postgresql+psycopg2://u@h/d"


def test_inconsistent_limits_fail_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMIKB_MAX_REPROCESSING_RUNS", "20")
    monkeypatch.setenv("LUMIKB_MAX_CONCURRENT_RUNS", "10")
    with pytest.raises(ConfigError, match="LUMIKB_MAX_REPROCESSING_RUNS must be below"):
        load_settings()
    monkeypatch.delenv("LUMIKB_MAX_REPROCESSING_RUNS")
    monkeypatch.setenv("LUMIKB_LLM_POOL_LIMIT", "zero")
    with pytest.raises(ConfigError, match="LUMIKB_LLM_POOL_LIMIT"):
        load_settings()
