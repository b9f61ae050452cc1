"""docker-compose.yml is safe by default: nothing published but the UIs, on loopback, behind a
password, and no default passwords (issue 15)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "docker-compose.yml").read_text()


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(TEXT))


def test_only_the_proxied_dagster_ui_and_flower_are_published_and_on_loopback_by_default() -> None:
    published = {name: service["ports"] for name, service in compose()["services"].items() if service.get("ports")}
    assert set(published) == {"ui", "flower"}
    for ports in published.values():
        for port in ports:
            assert str(port).startswith("${LUMIKB_BIND_ADDRESS:-127.0.0.1}:"), port


def test_the_dagster_ui_is_reached_only_through_a_basic_auth_proxy() -> None:
    services = compose()["services"]
    assert "ports" not in services["webserver"]
    ui = services["ui"]
    assert ui["image"].startswith("caddy:") and "./docker/Caddyfile:/etc/caddy/Caddyfile:ro" in ui["volumes"]
    caddyfile = (ROOT / "docker" / "Caddyfile").read_text()
    assert "basic_auth" in caddyfile and "reverse_proxy webserver:3000" in caddyfile
    assert ui["environment"]["LUMIKB_UI_PASSWORD"].startswith("${LUMIKB_UI_PASSWORD:?")


def test_flower_requires_basic_auth_from_a_required_variable() -> None:
    flower = compose()["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${LUMIKB_FLOWER_BASIC_AUTH:?")


def test_no_password_has_a_default_every_one_is_a_required_variable() -> None:
    services = compose()["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${LUMIKB_POSTGRES_PASSWORD:?")
    assert services["neo4j"]["environment"]["NEO4J_AUTH"] == "neo4j/${LUMIKB_NEO4J_PASSWORD:?set LUMIKB_NEO4J_PASSWORD}"
    assert "--requirepass" in services["redis"]["command"]
    env = compose()["x-lumikb-env"]
    assert env["LUMIKB_NEO4J_PASSWORD"].startswith("${LUMIKB_NEO4J_PASSWORD:?")
    for name in ("LUMIKB_DATABASE_URL", "LUMIKB_DAGSTER_PG_URL", "LUMIKB_REDIS_URL", "CELERY_BROKER_URL"):
        assert re.search(r"://[^@]*:\$\{LUMIKB_(POSTGRES|REDIS)_PASSWORD:\?", env[name]), name
    # No literal credentials anywhere: every ':...@' in a URL is a required variable.
    for userinfo in re.findall(r"://([^/\s@]*)@", TEXT):
        assert ":${" in userinfo and ":?" in userinfo, userinfo
    assert "change-me" not in TEXT and "lumikb:lumikb@" not in TEXT
