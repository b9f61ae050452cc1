"""Errors the user can act on. Each says which thing is wrong and what to do about it."""

from __future__ import annotations


class LumikbError(Exception):
    """Base of the pipeline's own errors; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(LumikbError):
    """Bad usage or bad input (exit code 2): a file, a slug, an argument the user can fix."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid environment variable; the message names it."""


class SchemaFileError(UsageError):
    """A schema file that breaks the rules; the message points at the line."""


class NotFoundError(UsageError):
    """An unknown KB, job or document named by the user."""


class SchemaViolation(LumikbError):
    """An extraction holds a type that the KB's schema version does not allow; nothing was written."""
