"""Keep secrets out of logs, Dagster event logs, stored errors and messages.

`scrub` removes the configured secrets (LLM API key, Neo4j password, passwords in URLs) and
anything shaped like an API key or bearer token from a text before it leaves the process.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Iterable

_SECRET_VARIABLES = ("LUMIKB_LLM_API_KEY", "LUMIKB_NEO4J_PASSWORD", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
_PATTERNS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"),
    re.compile(r"(?i)\b(bearer|api[_-]?key|authorization|x-api-key)([\"'\s:=]+)([^\s\"',}]{6,})"),
    re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]+)@"),
]
REDACTED = "[REDACTED]"


def _known_secrets() -> list[str]:
    return [value for name in _SECRET_VARIABLES if (value := os.environ.get(name)) and len(value) >= 4]


def scrub(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    """`text` with every known secret and key-shaped token replaced by [REDACTED]."""
    for secret in (*_known_secrets(), *extra_secrets):
        if secret:
            text = text.replace(secret, REDACTED)
    text = _PATTERNS[0].sub(REDACTED, text)
    text = _PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _PATTERNS[2].sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


class ScrubbingFilter(logging.Filter):
    """A logging filter that scrubs every record's message and traceback: the secrets `scrub` knows,
    and those added to `secrets` (an API key read from settings rather than the environment)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message, tuple(self.secrets))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # The handler would format the traceback later, with the secret in the exception's message.
            text = "".join(traceback.format_exception(record.exc_info[1]))
            record.msg = f"{record.msg}\n{scrub(text, tuple(self.secrets))}"
            record.exc_info, record.exc_text = None, None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text, tuple(self.secrets))
        return True


_FILTER = ScrubbingFilter()


def protect_loggers(names: Iterable[str], secret: str | None = None) -> None:
    """Install the process's one `ScrubbingFilter` on the loggers `names` (idempotent); `secret`, when
    given, is scrubbed by value from then on."""
    if secret:
        _FILTER.secrets.add(secret)
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
