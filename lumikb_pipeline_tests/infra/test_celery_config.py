"""The Celery side: transport options, acknowledgement, worker commands."""

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.infra.celery_config import celery_config_source
from lumikb_pipeline.orchestration.processes import service_specs, worker_argv


def test_transport_options_keep_dagster_celerys_and_outlast_the_longest_step() -> None:
    settings = Settings()
    config = celery_config_source(settings, "reprocessing")
    transport = config["broker_transport_options"]
    assert {"max_retries", "interval_start", "interval_step", "interval_max"} <= set(transport)
    assert transport["visibility_timeout"] > settings.reextraction_max_runtime_s
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_default_queue"] == "reprocessing"


def test_worker_command_listens_on_one_queue_with_bounded_memory() -> None:
    settings = Settings(reprocessing_concurrency=3, worker_max_memory_kb=600_000)
    argv = worker_argv("reprocessing", settings)
    assert argv[argv.index("-A") + 1] == "lumikb_pipeline.orchestration.celery_app"
    assert argv[argv.index("-Q") + 1] == "reprocessing"
    assert argv[argv.index("-c") + 1] == "3"
    assert argv[argv.index("--max-memory-per-child") + 1] == "600000"
    assert "--max-tasks-per-child" in argv and argv[argv.index("--prefetch-multiplier") + 1] == "1"


def test_lumikb_up_starts_one_worker_per_queue(tmp_path: object) -> None:
    from pathlib import Path

    settings = Settings(home=Path(str(tmp_path)))
    names = [spec.name for spec in service_specs(settings, Path("w.yaml"))]
    assert names == ["code-server", "webserver", "daemon", "worker-document_processing", "worker-reprocessing"]
