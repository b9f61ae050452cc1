"""The fake LLM server as the tests use it: a real `lumikb_pipeline.testing.fake_llm_server` subprocess
speaking the OpenAI chat-completions API, and a small client for its control endpoints. The fixtures
`fake_llm_session` and `fake_llm` (lumikb_pipeline_tests/conftest.py) start one per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from lumikb_pipeline.testing.fake_llm_server import raise_priority


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


DEFAULT_CONFIG: dict[str, Any] = {
    "latency_mean_s": 0.0, "latency_jitter_s": 0.0, "rate_429": 0.0, "retry_after_s": 1.0, "rate_5xx": 0.0,
    "malformed_rate": 0.0, "truncate_at": 0.6, "seed": 0, "require_api_key": None, "echo_key_in_5xx": False,
    "malformed_kinds": ["malformed_json", "truncated", "prose", "empty", "unknown_types", "bad_endpoints"],
}
