"""Statements that name many documents go in pages: PostgreSQL takes at most 65,535 bind parameters
in one statement, and a job or a KB can name 100,000 documents."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, String, any_, literal
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

T = TypeVar("T")

# Ids or keys per `IN (...)` of one statement.
PAGE = 1000


def pages(items: Sequence[T], size: int = PAGE) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def one_of(session: Session, column: Any, values: Sequence[str]) -> ColumnElement[bool]:
    """`column IN values` for a text column. On PostgreSQL it is `column = ANY(:values)`, one array
    parameter: an `IN` list has a parameter per value for SQLAlchemy to render and psycopg to parse,
    which took a third of `lumikb reextract --all` at 20,000 documents. SQLite has no arrays."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(list(values), ARRAY(String)))
    return column.in_(values)
