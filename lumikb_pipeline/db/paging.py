"""Statements that name many documents go in pages: PostgreSQL takes at most 65,535 bind parameters
in one statement, and a job or a KB can name 100,000 documents."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# Ids or keys per `IN (...)` of one statement.
PAGE = 1000


def pages(items: Sequence[T], size: int = PAGE) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
