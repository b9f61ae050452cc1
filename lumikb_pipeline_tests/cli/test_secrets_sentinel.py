"""The secrets sentinel (issue 15): sentinel passwords and keys holding '/', '@', ':' and '%' in every
URL and key variable; every CLI command on its failure paths (unreachable services) and, on the
embedded defaults with the fake LLM, on its success paths up to a full `lumikb demo` (Dagster runs in
process). Nothing the commands print, log or store under LUMIKB_HOME holds a sentinel, in any spelling.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline_tests.fake_llm import FakeServer, start_fake_server, stop_fake_server

runner = CliRunner()
TOKEN = secrets.token_hex(6)
SCHEMA = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo" / "schema_v1.yaml"
LUMIKB = str(Path(sys.executable).parent / "lumikb")


def sentinel(name: str) -> str:
    return f"S3nt/{name}@{TOKEN}:p%w"


SENTINELS = {name: sentinel(name) for name in ("db", "redis", "broker", "neo4j", "llm", "dagster", "webhook", "raw")}


def spellings(value: str) -> set[str]:
    return {value, quote(value, safe=""), quote_plus(value), quote(value), value.split("@")[0] + "@" + TOKEN}


def unreachable_env(home: Path) -> dict[str, str]:
    enc = {name: quote(value, safe="") for name, value in SENTINELS.items()}
    return {
        "LUMIKB_HOME": str(home),
        "LUMIKB_DATABASE_URL": f"postgresql+psycopg://u:{enc['db']}@127.0.0.1:1/db",
        "LUMIKB_REDIS_URL": f"redis://:{enc['redis']}@127.0.0.1:1/0",
        "CELERY_BROKER_URL": f"redis://user:{enc['broker']}@127.0.0.1:1/1",
        "LUMIKB_NEO4J_URI": "bolt://127.0.0.1:1",
        "LUMIKB_NEO4J_PASSWORD": SENTINELS["neo4j"],
        "LUMIKB_LLM_API_KEY": SENTINELS["llm"],
        "LUMIKB_DAGSTER_PG_URL": f"postgresql+psycopg2://u:{enc['dagster']}@127.0.0.1:1/dagster",
        "LUMIKB_DRIFT_WEBHOOK_URL": f"http://hook:{enc['webhook']}@127.0.0.1:1/hook",
    }


def _clean_base() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LUMIKB_", "CELERY_", "DAGSTER_"))}


def assert_no_sentinel(text: str, where: str) -> None:
    for value in SENTINELS.values():
        for spelling in spellings(value):
            assert spelling not in text, f"{where} holds the sentinel {spelling!r}"


def assert_home_is_clean(home: Path) -> None:
    for path in home.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes().decode("utf-8", "replace")
            assert_no_sentinel(data, str(path))


FAILURE_COMMANDS = [
    ["kb", "list"], ["kb", "list", "--json"], ["kb", "create", "k", "--schema", str(SCHEMA)],
    ["schema", "set", "k", str(SCHEMA)], ["schema", "show", "k"], ["ingest", "k", str(SCHEMA)],
    ["reextract", "k", "--dry-run"], ["reextract", "k", "--all", "--wait", "--idle-timeout", "1"],
    ["progress", "job"], ["cancel", "job"], ["drift"], ["drift", "--json"], ["schedule", "show"],
    ["schedule", "set-cron", "0 2 * * *"], ["schedule", "enable"], ["db", "upgrade"], ["status"], ["down"],
]


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith(("LUMIKB_", "CELERY_", "DAGSTER_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    for name, value in unreachable_env(home).items():
        monkeypatch.setenv(name, value)
    from lumikb_pipeline.core.config import get_settings

    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.mark.parametrize("args", FAILURE_COMMANDS, ids=" ".join)
def test_no_command_leaks_a_sentinel_on_its_failure_path(unreachable: Path, args: list[str],
                                                         caplog: pytest.LogCaptureFixture,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code != 0 or args[0] in ("down",), result.output
    captured = capfd.readouterr()
    assert_no_sentinel(result.output + captured.out + captured.err, "the output")
    assert_no_sentinel(caplog.text, "the log")
    assert "Traceback" not in result.output
    if unreachable.exists():
        assert_home_is_clean(unreachable)


def test_a_raw_password_with_slash_and_colon_in_a_url_never_reaches_the_terminal(tmp_path: Path) -> None:
    # As a user writes it, not percent-encoded; a real process, so the real streams and logging.
    raw = SENTINELS["raw"].replace("@", "")  # an '@' would end the password here
    env = {**_clean_base(), "LUMIKB_HOME": str(tmp_path / "home"),
           "LUMIKB_DATABASE_URL": f"postgresql+psycopg://u:{raw}@127.0.0.1:1/db",
           "LUMIKB_REDIS_URL": f"redis://:{raw}@127.0.0.1:1/0"}
    for args in (["kb", "list"], ["db", "upgrade"], ["progress", "x"]):
        done = subprocess.run([LUMIKB, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode in (1, 2), done.stderr
        assert raw not in done.stdout + done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


@pytest.fixture
def fake_llm_with_key() -> Iterator[FakeServer]:
    server = start_fake_server()
    server.configure(require_api_key=SENTINELS["llm"], latency_mean_s=0.0, latency_jitter_s=0.0)
    yield server
    stop_fake_server(server)


@pytest.mark.slow
def test_no_sentinel_on_the_success_paths_up_to_a_full_demo(tmp_path: Path, fake_llm_with_key: FakeServer) -> None:
    """The embedded defaults, the API key a sentinel that the fake LLM requires (so every successful
    call proves it was sent), the other secrets sentinels in unused or failing variables."""
    home = tmp_path / "home"
    env = {
        **_clean_base(), "LUMIKB_HOME": str(home), "LUMIKB_LLM_MODEL": "openai/gpt-4o-mini",
        "LUMIKB_LLM_API_BASE": fake_llm_with_key.api_base, "LUMIKB_LLM_API_KEY": SENTINELS["llm"],
        "LUMIKB_LLM_RATE_LIMIT": "500/s", "LUMIKB_NEO4J_PASSWORD": SENTINELS["neo4j"],
        "LUMIKB_DRIFT_WEBHOOK_URL": f"http://hook:{quote(SENTINELS['webhook'], safe='')}@127.0.0.1:1/hook",
        "LUMIKB_DRIFT_THRESHOLD": "0",
    }
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Acme Corp hired Dr. Jane Doe in Berlin.")
    output = []
    try:
        output = _run_all(env, docs)
    finally:
        from lumikb_pipeline.infra.redis_client import stop_embedded_redis

        stop_embedded_redis(home)  # `progress` after the demo started it again
    assert "LLM calls" in output[7]
    calls = fake_llm_with_key.calls()
    assert calls and all(call["status"] == 200 for call in calls)  # the key was sent, and accepted
    assert_no_sentinel("\n".join(output), "the output")
    assert_home_is_clean(home)


def _run_all(env: dict[str, str], docs: Path) -> list[str]:
    output = []
    for args in (["kb", "create", "k", "--schema", str(SCHEMA)], ["ingest", "k", str(docs)], ["kb", "list"],
                 ["schema", "show", "k"], ["reextract", "k", "--dry-run"], ["drift"], ["schedule", "show"],
                 ["demo"], ["progress", "--json", "x"], ["drift", "--json"]):
        done = subprocess.run([LUMIKB, *args], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode in (0, 2) and "Traceback" not in done.stderr, (args, done.stderr[-3000:])
        output.append(done.stdout + done.stderr)
    return output
