"""One scrubber for every log record and every message the CLI prints (issue 15)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline.core import scrub

runner = CliRunner()
PASSWORD = "Sup3r/Se@c:re%t"


@pytest.mark.parametrize("text, secret", [
    ("postgresql+psycopg://u:Sup3r/Secret@127.0.0.1:1/db", "Sup3r/Secret"),
    (f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:1/db", PASSWORD),
    ("redis://:pw@host/0", ":pw@"),
    ("redis://:p%40ss%2Fw0rd@host:6379/0 failed", "p%40ss%2Fw0rd"),
    ("bolt://neo4j:a:b:c@host:7687", "a:b:c"),
    ("Authorization: Bearer abc.DEF-123_xyz", "abc.DEF-123_xyz"),
    ("{'authorization': 'Bearer tok/en+with=chars'}", "tok/en+with=chars"),
    ("headers={'Authorization': 'Basic dXNlcjpwYXNz'}", "dXNlcjpwYXNz"),
    ("x-api-key: 0123456789abcdef", "0123456789abcdef"),
    ("host=db password=hunter2hunter2 user=u", "hunter2hunter2"),
    ("sk-proj-abcdefghijklmnop", "abcdefghijklmnop"),
])
def test_scrub_removes_passwords_tokens_and_keys_whatever_characters_they_hold(text: str, secret: str) -> None:
    cleaned = scrub.scrub(text)
    assert secret not in cleaned
    assert scrub.REDACTED in cleaned


def test_scrub_keeps_ordinary_messages_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LUMIKB_DATABASE_URL", "LUMIKB_DAGSTER_PG_URL", "LUMIKB_PG_ADMIN_URL"):
        monkeypatch.delenv(name, raising=False)  # their passwords are scrubbed by value wherever they appear
    message = 'password authentication failed for user "alice"; see https://example.com/docs?a=1'
    assert scrub.scrub(message) == message


def test_configured_secrets_are_scrubbed_by_value_raw_and_percent_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMIKB_NEO4J_PASSWORD", PASSWORD)
    monkeypatch.setenv("LUMIKB_DAGSTER_PG_URL", "postgresql+psycopg2://u:pg%2Fsecret%40x@h/db")
    text = f"neo4j said {PASSWORD}; encoded pg%2Fsecret%40x; decoded pg/secret@x; quoted Sup3r%2FSe%40c%3Are%25t"
    cleaned = scrub.scrub(text)
    for leaked in (PASSWORD, "pg%2Fsecret%40x", "pg/secret@x", "Sup3r%2FSe%40c%3Are%25t"):
        assert leaked not in cleaned


def test_every_log_record_is_scrubbed_once_installed_whichever_logger_and_handler() -> None:
    scrub.install()
    scrub.register_secret("registered-sentinel-value")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("some.third.party")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting to %s", "redis://:pw-sentinel@host/0")
        logger.warning("key registered-sentinel-value and Authorization: Bearer tok-sentinel-1234")
        try:
            raise RuntimeError("failed: postgresql://u:exc%2Fsentinel@h/db")
        except RuntimeError:
            logger.exception("it broke")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    for leaked in ("pw-sentinel", "registered-sentinel-value", "tok-sentinel-1234", "exc%2Fsentinel"):
        assert leaked not in output
    assert "it broke" in output and "RuntimeError" in output


def test_there_is_one_scrubbing_filter_in_the_package() -> None:
    package = Path(scrub.__file__).resolve().parents[1]
    filters = [path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if "(logging.Filter)" in path.read_text()]
    assert filters == ["core/scrub.py"]


def test_the_cli_prints_no_database_password_holding_a_slash(lumikb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMIKB_DATABASE_URL", "postgresql+psycopg://u:Sup3r/Secret@127.0.0.1:1/db")
    result = runner.invoke(app, ["kb", "list"])
    assert result.exit_code == 1
    assert "Sup3r" not in result.output and "Secret" not in result.output
    assert "cannot reach the app database" in result.output


def test_db_upgrade_against_an_unreachable_database_prints_one_line(
    lumikb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUMIKB_DATABASE_URL", "postgresql+psycopg://u:p%2Fw@127.0.0.1:1/db")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: cannot reach the app database") and "Traceback" not in result.output
    assert "p%2Fw" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_scrubbed_stream_scrubs_what_the_cli_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMIKB_LLM_API_KEY", "key:with/odd@chars%")
    target = io.StringIO()
    stream = scrub.ScrubbedStream(target)
    stream.write("the key is key:with/odd@chars% and redis://:x@y/0\n")
    assert "key:with/odd@chars%" not in target.getvalue() and ":x@" not in target.getvalue()
