"""Keep secrets out of logs, Dagster event logs, stored errors and everything the CLI prints.

One scrubber for the whole package. `scrub` removes from a text:
- the configured secrets by value (the LLM API key, the Neo4j password, the password of every
  `*_URL`/`*_URI` variable, anything registered with `register_secret`), raw and percent-encoded;
- the password of any URL (`scheme://user:pw@host`, `redis://:pw@host`), whatever characters it holds;
- bearer/basic tokens (`Authorization: Bearer <token>`), `api_key=...`/`password=...` pairs and
  `sk-...` keys.

`install()` puts it on every log record of the process (a log-record factory, so records of every
logger are scrubbed whichever handler emits them, plus a filter on the root handlers) and
`protect_streams()` wraps stdout and stderr, so a secret reaches no terminal, log file or event log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Any, TextIO
from urllib.parse import quote, quote_plus, unquote

_SECRET_VARIABLES = (
    "LUMIKB_LLM_API_KEY", "LUMIKB_NEO4J_PASSWORD", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
    "POSTGRES_PASSWORD", "NEO4J_PASSWORD", "LUMIKB_FLOWER_BASIC_AUTH", "LUMIKB_UI_PASSWORD",
)
# A URL's userinfo: everything between '://' and the last '@' before the host, which may hold any
# character a careless password holds ('/', ':', '@', '%'); the user part may be empty.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@'\"<>]*):(?P<pw>[^\s'\"<>]*)@")
_AUTH_HEADER = re.compile(
    r"(?i)\b(?P<head>(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)(?P<scheme>(?:bearer|basic|token|digest)\s+)?"
    r"(?P<token>[^\s\"',}]+)"
)
_BEARER = re.compile(r"(?i)\b(?P<head>bearer\s+)(?P<token>[^\s\"',}]{4,})")
_KEY_VALUE = re.compile(
    r"(?i)\b(?P<head>(?:x-)?api[_-]?key|password|passwd|secret|access[_-]?token)"
    r"(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"',};&]+)"
)
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")
REDACTED = "[REDACTED]"
# Scrubbing by value needs a value unlike ordinary words: a short one ("neo4j", "lumikb") would redact
# them everywhere. Shorter secrets are still removed from URLs, headers and key=value pairs by shape.
_MIN_SECRET_CHARS = 8

_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Scrub `value` from everything from now on (a key that came from settings, not the environment)."""
    if value and len(value) >= _MIN_SECRET_CHARS:
        _registered.add(value)


def _url_password(url: str) -> str | None:
    match = _URL_USERINFO.search(url)
    return match.group("pw") if match and match.group("pw") else None


def known_secrets(environ: Any = None) -> set[str]:
    """Every configured secret by value, with its percent-decoded and -encoded spellings."""
    env = os.environ if environ is None else environ
    values = {env.get(name) for name in _SECRET_VARIABLES} | set(_registered)
    for name, value in env.items():
        if name.endswith(("_URL", "_URI", "_DSN")) and "://" in value:
            values.add(_url_password(value))
        elif name == "NEO4J_AUTH" and "/" in value:  # the Neo4j image's `user/password`
            values.add(value.split("/", 1)[1])
    spellings: set[str] = set()
    for value in filter(None, values):
        spellings.update({value, unquote(value), quote(value, safe=""), quote_plus(value), quote(unquote(value))})
    return {s for s in spellings if len(s) >= _MIN_SECRET_CHARS}


def scrub(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    """`text` with every known secret and password-, key- or token-shaped part replaced by [REDACTED]."""
    if not text:
        return text
    # Longest first, so a secret that contains another is removed whole.
    for secret in sorted({*known_secrets(), *(s for s in extra_secrets if s)}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{REDACTED}@", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m.group('head')}{m.group('scheme') or ''}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group('head')}{m.group('sep')}{REDACTED}", text)
    return _SK_KEY.sub(REDACTED, text)


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub a log record in place: its message, its arguments and its traceback."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: let the handler report it as logging does
        return record
    cleaned = scrub(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        # A handler would format the traceback later, with the secret in the exception's message.
        record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    elif record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    return record


class ScrubbingFilter(logging.Filter):
    """A logging filter that scrubs every record (installed on the root handlers by `install`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


_FILTER = ScrubbingFilter()
_base_factory = logging.getLogRecordFactory()


def _scrubbing_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    return scrub_record(_base_factory(*args, **kwargs))


def install() -> None:
    """Scrub every log record this process creates, from any logger (idempotent)."""
    global _base_factory
    current = logging.getLogRecordFactory()
    if current is not _scrubbing_factory:
        _base_factory = current
        logging.setLogRecordFactory(_scrubbing_factory)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


class ScrubbedStream:
    """A text stream that scrubs what is written to it before passing it on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        cleaned = scrub(text)
        try:
            self._stream.write(cleaned)
        except UnicodeEncodeError:
            # A lone surrogate (a file name or argument that was not valid UTF-8) is shown escaped
            # rather than crashing the command.
            encoding = getattr(self._stream, "encoding", None) or "utf-8"
            self._stream.write(cleaned.encode(encoding, "backslashreplace").decode(encoding))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, errors, ...
        return getattr(self._stream, name)


def protect_streams() -> None:
    """Wrap this process's stdout and stderr in `ScrubbedStream` (idempotent)."""
    if not isinstance(sys.stdout, ScrubbedStream):
        sys.stdout = ScrubbedStream(sys.stdout)
    if not isinstance(sys.stderr, ScrubbedStream):
        sys.stderr = ScrubbedStream(sys.stderr)
