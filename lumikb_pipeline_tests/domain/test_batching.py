"""Batching documents into runs of consecutive partitions."""

import pytest

from lumikb_pipeline.domain.batching import chunked, contiguous_batches

ORDER = [f"d{i}" for i in range(10)]


def keys(batches: list) -> list[tuple[str, ...]]:
    return [batch.keys for batch in batches]


def test_consecutive_selection_is_cut_at_the_batch_size() -> None:
    assert keys(contiguous_batches(ORDER, set(ORDER[:7]), 3)) == [("d0", "d1", "d2"), ("d3", "d4", "d5"), ("d6",)]


def test_a_gap_starts_a_new_batch_so_a_run_never_covers_an_unselected_partition() -> None:
    batches = contiguous_batches(ORDER, {"d1", "d2", "d4", "d7", "d8", "d9"}, 25)
    assert keys(batches) == [("d1", "d2"), ("d4",), ("d7", "d8", "d9")]
    assert [(b.first, b.last) for b in batches] == [("d1", "d2"), ("d4", "d4"), ("d7", "d9")]


def test_non_adjacent_selection_gives_one_run_per_document() -> None:
    assert len(contiguous_batches(ORDER, set(ORDER[::2]), 25)) == 5


def test_keys_that_are_not_partitions_are_left_out() -> None:
    assert keys(contiguous_batches(ORDER, {"d0", "ghost"}, 5)) == [("d0",)]


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        contiguous_batches(ORDER, {"d0"}, 0)


def test_chunked_slices() -> None:
    assert [list(c) for c in chunked(["a", "b", "c"], 2)] == [["a", "b"], ["c"]]
