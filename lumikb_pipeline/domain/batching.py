"""Batching documents into Dagster runs.

A run of a partitioned asset targets one *range* of partitions, and dynamic partitions are ordered
by when they were added. So a batch is a run of consecutive partitions that are all selected; a
selection with gaps becomes several batches (Dagster's own backfills batch the same way).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PartitionBatch:
    """Consecutive partition keys run together: the range `first..last`."""

    keys: tuple[str, ...]

    @property
    def first(self) -> str:
        return self.keys[0]

    @property
    def last(self) -> str:
        return self.keys[-1]

    def __len__(self) -> int:
        return len(self.keys)


def contiguous_batches(order: Sequence[str], selected: Collection[str], max_size: int) -> list[PartitionBatch]:
    """Split `selected` into batches of at most `max_size` keys, each a gap-free stretch of `order`.

    Keys of `selected` that are not in `order` are left out (they are not partitions).
    """
    if max_size < 1:
        raise ValueError("max_size must be at least 1")
    chosen = selected if isinstance(selected, set | frozenset) else set(selected)
    batches: list[PartitionBatch] = []
    current: list[str] = []
    for key in order:
        if key in chosen:
            current.append(key)
            if len(current) == max_size:
                batches.append(PartitionBatch(tuple(current)))
                current = []
        elif current:
            batches.append(PartitionBatch(tuple(current)))
            current = []
    if current:
        batches.append(PartitionBatch(tuple(current)))
    return batches


def chunked(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    """`items` in slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
