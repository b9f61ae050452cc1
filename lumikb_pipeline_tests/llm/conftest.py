"""Fixtures of the LLM tests: the fake LLM server as a real subprocess, schemas, a KB row, settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.db.models import KnowledgeBase
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import DomainSchema, parse_schema_text
from lumikb_pipeline.testing.fake_llm_server import raise_priority

SCHEMA_V1 = """
entity_types:
  - name: Organization
    description: A company, agency or institution.
  - name: Person
    description: A human being, e.g. an employee or founder.
  - name: Location
    description: A city, country or other place.
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
    description: The organisation employs the person.
  - name: LOCATED_IN
    source: [Organization, Person]
    target: [Location]
    description: Based or located in the place.
"""

# Version 2 adds a type; any change makes a new version whose checkpoints are separate.
SCHEMA_V2 = SCHEMA_V1.replace(
    "relationship_types:",
    "  - name: Product\n    description: A product or service sold by a company.\nrelationship_types:",
)


def pytest_configure(config: pytest.Config) -> None:
    # The OpenAI SDK's types make pydantic warn once on LiteLLM's first call; not about our code.
    config.addinivalue_line("filterwarnings", "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning")


@dataclass
class FakeServer:
    """A running `lumikb-fake-llm` process and a small client for its control endpoints."""

    url: str
    process: subprocess.Popen[str]

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def calls(self) -> list[dict[str, Any]]:
        """Every call the server received since the last reset, in arrival order."""
        return sorted(self._request("GET", "/_calls")["calls"], key=lambda c: c["arrived"])

    def reset(self) -> None:
        self._request("POST", "/_reset", {})

    def configure(self, **changes: Any) -> dict[str, Any]:
        return dict(self._request("POST", "/_config", changes))


def start_fake_server(*args: str) -> FakeServer:
    """Start the fake server on a free port; wait until it answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lumikb_pipeline.testing.fake_llm_server", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("listening on "):
        process.kill()
        pytest.fail(f"the fake LLM server did not start: {line!r}")
    server = FakeServer(url=line.removeprefix("listening on "), process=process)
    raise_priority(process.pid)  # its arrival times are what limit tests check
    deadline = time.monotonic() + 15
    while True:
        try:
            server._request("GET", "/_health")
            return server
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def stop_fake_server(server: FakeServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def fake_llm_session() -> Iterator[FakeServer]:
    server = start_fake_server()
    yield server
    stop_fake_server(server)


@pytest.fixture
def fake_llm(fake_llm_session: FakeServer) -> FakeServer:
    """The fake LLM server (one process per test session), reset and with default behaviour."""
    fake_llm_session.reset()
    fake_llm_session.configure(**_DEFAULT_CONFIG)
    return fake_llm_session


_DEFAULT_CONFIG: dict[str, Any] = {
    "latency_mean_s": 0.0, "latency_jitter_s": 0.0, "rate_429": 0.0, "retry_after_s": 1.0, "rate_5xx": 0.0,
    "malformed_rate": 0.0, "truncate_at": 0.6, "seed": 0, "require_api_key": None, "echo_key_in_5xx": False,
    "malformed_kinds": ["malformed_json", "truncated", "prose", "empty", "unknown_types", "bad_endpoints"],
}


@pytest.fixture
def schema_v1() -> DomainSchema:
    return parse_schema_text(SCHEMA_V1)


@pytest.fixture
def schema_v2() -> DomainSchema:
    return parse_schema_text(SCHEMA_V2)


def create_kb(database_url: str, slug: str = "acme") -> int:
    """A knowledge base row (checkpoints reference it); returns its id."""
    with session_scope(database_url) as session:
        kb = KnowledgeBase(slug=slug, name=slug.title(), current_schema_version=1)
        session.add(kb)
        session.flush()
        return kb.id


@pytest.fixture
def llm_settings(fake_llm: FakeServer, pg_url: str, redis_url: str) -> Callable[..., Settings]:
    """Settings for the fake server on PostgreSQL and the test Redis; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "llm_model": "openai/gpt-4o-mini", "llm_api_base": fake_llm.api_base, "llm_api_key": "sk-test-key",
            "llm_rate_limit": "50/s", "llm_max_attempts": 3, "database_url": pg_url, "redis_url": redis_url,
        }
        return Settings(**{**values, **overrides})

    return make
