"""The Celery worker command of `lumikb up`: bounded pool and memory, and autoscaling down when the
queue is empty with `LUMIKB_WORKER_AUTOSCALE_MIN` (the running behaviour is
lumikb_pipeline_tests/dagster/test_resource_bounds.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.errors import ConfigError
from lumikb_pipeline.orchestration.processes import worker_argv

REPO = Path(__file__).resolve().parents[2]


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_without_autoscale_a_worker_keeps_its_full_pool() -> None:
    argv = worker_argv("reprocessing", Settings(reprocessing_concurrency=3))
    assert _option(argv, "-c") == "3"
    assert "--autoscale" not in argv
    assert _option(argv, "--max-tasks-per-child") == "200"
    assert _option(argv, "--max-memory-per-child") == "1500000"


def test_autoscale_min_makes_each_pool_shrink_to_it_and_grow_to_the_queues_concurrency() -> None:
    settings = Settings(worker_autoscale_min=0, document_processing_concurrency=4, reprocessing_concurrency=2)
    assert _option(worker_argv("document_processing", settings), "--autoscale") == "4,0"
    assert _option(worker_argv("reprocessing", settings), "--autoscale") == "2,0"


def test_an_autoscale_min_at_or_above_a_concurrency_is_refused_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lumikb_pipeline.core.config import load_settings

    monkeypatch.setenv("LUMIKB_WORKER_AUTOSCALE_MIN", "2")
    monkeypatch.setenv("LUMIKB_REPROCESSING_CONCURRENCY", "2")
    with pytest.raises(ConfigError, match="LUMIKB_WORKER_AUTOSCALE_MIN must be below"):
        load_settings()


def test_docker_compose_runs_the_worker_command_of_lumikb_up() -> None:
    """The compose file's worker commands carry the same options as `worker_argv` (its memory
    bound is the container's, smaller than the default)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for service, queue in (("worker-document-processing", "document_processing"),
                           ("worker-reprocessing", "reprocessing")):
        command = compose["services"][service]["command"]
        ours = worker_argv(queue, Settings())  # type: ignore[arg-type]
        options = {a for a in ours[ours.index("worker"):] if a.startswith("-")}
        assert options <= set(command), (service, options - set(command))
        assert _option(command, "-Q") == queue
