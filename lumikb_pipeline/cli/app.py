"""The `lumikb` Typer application and the error handling every command shares."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from lumikb_pipeline.core import scrub as scrubber
from lumikb_pipeline.core.errors import LumikbError, UsageError

app = typer.Typer(
    name="lumikb",
    help="Batch (re-)extraction of LumiKB documents into a knowledge graph, kept in step with each KB's schema.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
kb_app = typer.Typer(help="Knowledge bases.", no_args_is_help=True)
schema_app = typer.Typer(help="Domain schema versions.", no_args_is_help=True)
db_app = typer.Typer(help="The app database.", no_args_is_help=True)
schedule_app = typer.Typer(help="The schema-drift check's schedule (changed at run time).", no_args_is_help=True)
app.add_typer(kb_app, name="kb")
app.add_typer(schema_app, name="schema")
app.add_typer(db_app, name="db")
app.add_typer(schedule_app, name="schedule")

# Everything printed is text: a slug, file name, job id or model answer holding `[/]` or `[link=…]`
# is shown as written, never interpreted as Rich markup (styles are given as `Text` objects).
console = Console(markup=False, emoji=False, highlight=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)


@app.callback()
def _start() -> None:
    """Before any command: scrub secrets from every log record and from everything printed."""
    scrubber.install()
    scrubber.protect_streams()


def print_error(message: str) -> None:
    """`error: <message>` on stderr, the message scrubbed and shown as text."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", scrubber.scrub(message)), soft_wrap=True)


def echo(text: str) -> None:
    """Machine-readable output (JSON, ids) on stdout, scrubbed."""
    typer.echo(scrubber.scrub(text))

F = TypeVar("F", bound=Callable[..., Any])


def check_argument(name: str, value: str) -> str:
    """Refuse a text argument that no database or file can hold: bytes that were not valid UTF-8
    (lone surrogates in argv) or a NUL character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "backslashreplace").decode()[:80]
        raise UsageError(f"{name.rstrip('_').replace('_', '-')} {shown!r} is not valid UTF-8 text; "
                         "pass it as UTF-8") from None
    if "\x00" in value:
        raise UsageError(f"{name.rstrip('_').replace('_', '-')} {value[:80]!r} holds a NUL character")
    return value


def handle_errors(command: F) -> F:
    """Turn the pipeline's errors into a scrubbed message on stderr and the right exit code
    (2 for bad usage or input, 1 for failures)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            for name, value in kwargs.items():
                for text in value if isinstance(value, list) else [value]:
                    if isinstance(text, str):
                        check_argument(name, text)
            return command(*args, **kwargs)
        except LumikbError as exc:
            print_error(str(exc))
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]
