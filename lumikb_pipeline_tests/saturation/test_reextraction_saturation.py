"""A re-extraction through the whole stack keeps the provider's limit saturated (issue 13, point 1).

Schema change -> the schema-version sensor -> backfill -> runs on `reprocessing` via dagster-celery,
against the fake LLM server, with batches of 25 (the default) and the in-flight cap's default (5·R).
At the server, every 10-s window from the first to the last 10% of the job's calls holds at least 90%
of the limit, and no 1-s window holds more than the limit, the job's first second included.

Two configurations, each on a stack of its own (its own limit and in-flight cap), which must not
share the machine with another stack. The fake server runs at real-time priority (`raise_priority`),
so its arrival times are when requests came.

- **At 10/s** (in CI, its own step of `scripts/test`, about 3.5 minutes): the configuration in which the
  issue saw re-extraction use 48.5-60.8% of the limit (latency 1 s ± 0.3 s, documents of 3 chunks,
  two `reprocessing` worker processes), with 400 documents, so the steady part holds 10 windows.
- **At 20/s**, the issue's point 3 (1,000 documents × 5 chunks, latency 0.5-1.5 s): marked
  unreliable, so no step of `scripts/test` runs it. Before the two hand-over fixes of 2026-12-02
  its lowest window missed 90% by 1-2 calls in two runs of three on this 2-core machine; since them
  it passed (18:05 UTC, 6.3 minutes, windows 188-191 of 200), and `benchmarks/run` met the same
  targets in this configuration (docs/benchmarks.md). It stays out of CI for its length beside the
  10/s test. Run it with `pytest -m "slow and unreliable" lumikb_pipeline_tests/saturation` on a
  quiet machine.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lumikb_pipeline_tests.dagster.saturation import measure_reextraction, overrides
from lumikb_pipeline_tests.dagster.stack import Stack, stack_environment, start_stack, stop_stack, unique_slug

pytestmark = pytest.mark.slow


@contextmanager
def saturation_stack(folder: Path, limit_per_s: int) -> Iterator[Stack]:
    """A stack of its own at `limit_per_s`, with batches of the default size; this process's
    environment points at it meanwhile."""
    from lumikb_pipeline.db.session import dispose_engines

    running = start_stack(folder, overrides({
        "LUMIKB_LLM_RATE_LIMIT": f"{limit_per_s}/s", "LUMIKB_REEXTRACT_BATCH_SIZE": "25",
    }))
    try:
        with stack_environment(running):
            yield running
    finally:
        dispose_engines()
        stop_stack(running)


@pytest.mark.parametrize(("limit_per_s", "documents", "chunks", "latency_jitter_s", "windows"), [
    pytest.param(10, 400, 3, 0.3, 9, id="10-per-s", marks=pytest.mark.timeout(900)),
    pytest.param(20, 1000, 5, 0.5, 8, id="20-per-s", marks=[pytest.mark.unreliable, pytest.mark.timeout(1500)]),
])
def test_reextraction_holds_the_limit_in_every_window(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, limit_per_s: int, documents: int, chunks: int,
    latency_jitter_s: float, windows: int,
) -> None:
    with saturation_stack(tmp_path_factory.mktemp(f"saturation-{limit_per_s}"), limit_per_s) as stack:
        result = measure_reextraction(stack, unique_slug("sat"), tmp_path / "docs", documents=documents,
                                      chunks=chunks, latency_mean_s=1.0, latency_jitter_s=latency_jitter_s)
    summary = result.summary()
    print(f"\n[saturation] {summary}")
    for run in result.runs:
        print(f"[saturation] run {run.run_id[:8]} created {run.created:.1f} started {run.started} ended {run.ended} "
              f"steps { {k.rsplit('.', 1)[-1]: (round(a, 1), round(b, 1)) for k, (a, b) in run.steps.items()} }")
    assert result.calls >= documents * chunks
    assert len(result.windows.counts) >= windows, summary
    assert result.windows.lowest_share >= 0.9, summary
    assert result.busiest_1s <= limit_per_s, summary
    assert result.busiest_1s_first_second <= limit_per_s, summary
