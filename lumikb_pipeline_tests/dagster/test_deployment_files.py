"""docker-compose.yml and the workspaces, checked by hand (no container engine here): the services
exist, the queues, module paths and variables they name exist in the code, images are pinned."""

import importlib
import re
from pathlib import Path
from typing import Any

import yaml

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import CELERY_APP_MODULE, DEFINITIONS_MODULE, QUEUES

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def command(service: dict[str, Any]) -> list[str]:
    return [str(part) for part in service["command"]]


def test_compose_has_every_service_of_the_deployment() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "neo4j", "code-server", "webserver", "daemon", "worker-document-processing",
            "worker-reprocessing", "flower"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in compose()["volumes"], f"{name}: undeclared volume {source}"
            else:
                assert (ROOT / source).exists(), f"{name}: missing file {source}"


def test_third_party_images_are_pinned() -> None:
    images = {name: service["image"] for name, service in compose()["services"].items() if "image" in service}
    assert images["neo4j"] == "neo4j:5.26-community"
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), f"{name} uses an unpinned image {image}"
    assert (ROOT / compose()["services"]["code-server"]["build"]["dockerfile"]).exists()


def test_one_worker_per_queue_with_the_celery_app_of_the_code() -> None:
    services = compose()["services"]
    workers = {name: command(service) for name, service in services.items() if name.startswith("worker-")}
    queues = sorted(argv[argv.index("-Q") + 1] for argv in workers.values())
    assert queues == sorted(QUEUES)
    for argv in workers.values():
        assert argv[argv.index("-A") + 1] == CELERY_APP_MODULE
        assert "--max-memory-per-child" in argv and "-c" in argv
    reprocessing = services["worker-reprocessing"]
    assert command(reprocessing)[command(reprocessing).index("-c") + 1] == "2"
    assert reprocessing["mem_limit"] == "2g"
    importlib.import_module(CELERY_APP_MODULE.rsplit(".", 1)[0])


def test_the_code_server_serves_the_definitions_module_the_workspace_points_at() -> None:
    services = compose()["services"]
    argv = command(services["code-server"])
    assert argv[:3] == ["dagster", "code-server", "start"]  # reloadable: `lumikb schedule set-cron`
    assert argv[argv.index("-m") + 1] == DEFINITIONS_MODULE
    port = int(argv[argv.index("-p") + 1])
    [location] = yaml.safe_load((ROOT / "docker" / "workspace.yaml").read_text())["load_from"]
    assert location["grpc_server"] == {"host": "code-server", "port": port, "location_name": "lumikb_pipeline"}
    [local] = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"]
    assert local["python_module"]["module_name"] == DEFINITIONS_MODULE
    importlib.import_module(DEFINITIONS_MODULE)
    for name in ("webserver", "daemon"):
        assert "/opt/dagster/workspace.yaml" in command(services[name])
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "COPY docker/dagster.yaml /opt/dagster/home/dagster.yaml" in dockerfile
    assert "COPY docker/workspace.yaml /opt/dagster/workspace.yaml" in dockerfile


def test_every_variable_compose_sets_is_read_by_the_code() -> None:
    environment = compose()["x-lumikb-env"]
    known = {f"LUMIKB_{name.upper()}" for name in Settings.model_fields} | {"CELERY_BROKER_URL", "DAGSTER_HOME"}
    assert set(environment) <= known, set(environment) - known
    assert environment["LUMIKB_DAGSTER_PG_URL"].startswith("postgresql+psycopg2://")
    assert environment["DAGSTER_HOME"] == "/opt/dagster/home"
    init = (ROOT / "docker" / "postgres-init.sql").read_text()
    database = re.search(r"/(\w+)$", environment["LUMIKB_DAGSTER_PG_URL"])
    assert database and f"CREATE DATABASE {database.group(1)}" in init
