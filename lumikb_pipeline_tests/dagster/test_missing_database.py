"""Sensors that meet a missing or empty app database (Dagster started with another LUMIKB_HOME than
the demo's) stop with one message naming LUMIKB_HOME, and never create a database."""

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, build_sensor_context

from lumikb_pipeline.core.errors import LumikbError
from lumikb_pipeline.resources import DatabaseResource, GraphStoreResource, ReextractionResource


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as instance:
        yield instance


def _sensors() -> list[object]:
    from lumikb_pipeline.sensors import (
        document_partitions_sensor,
        graph_checks_sensor,
        job_status_sensor,
        schema_version_sensor,
    )

    return [document_partitions_sensor, schema_version_sensor, job_status_sensor, graph_checks_sensor]


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_each_sensor_names_lumikb_home_and_creates_no_database(
    state: str, tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lumikb_pipeline.core.config import get_settings

    home = tmp_path / "elsewhere"
    monkeypatch.setenv("LUMIKB_HOME", str(home))
    monkeypatch.delenv("LUMIKB_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    path = home / "lumikb.sqlite3"
    if state == "empty":
        home.mkdir()
        sqlite3.connect(path).close()
    try:
        for sensor in _sensors():
            context = build_sensor_context(
                instance=instance,
                resources={
                    "database": DatabaseResource(), "graph_store": GraphStoreResource(),
                    "reextraction": ReextractionResource(),
                },
            )
            with pytest.raises(LumikbError) as raised:
                sensor(context)  # type: ignore[operator]
            message = str(raised.value)
            assert "LUMIKB_HOME" in message and str(home) in message, message
            assert ("does not exist" if state == "missing" else "has no lumikb tables") in message
        assert path.exists() == (state == "empty")
    finally:
        get_settings.cache_clear()
