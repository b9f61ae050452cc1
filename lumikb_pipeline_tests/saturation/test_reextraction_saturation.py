"""A re-extraction through the whole stack keeps the provider's limit saturated (issue 13, point 1).

Schema change -> the schema-version sensor -> backfill -> runs on `reprocessing` via dagster-celery, against
the fake LLM server with a latency of 0.5-1.5 s at a limit of 10/s: at the server, every 10-s window
from the first to the last 10% of the job's calls holds at least 90% of the limit, and no 1-s window
holds more than the limit, the job's first second included.

Its own stack (its own limit and in-flight cap): it must not share the machine with the end-to-end
stack. Marked unreliable: its one run (2026-11-30, load average 20 on 2 cores while other stacks
ran) held 71-95% per 10-s window (83% over the steady part) and saw one 11-call second
(docs/testing.md); it needs a run on a quiet machine before it joins CI, in a step of its own.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from lumikb_pipeline_tests.dagster.saturation import measure_reextraction, overrides
from lumikb_pipeline_tests.dagster.stack import Stack, start_stack, stop_stack, unique_slug

pytestmark = [pytest.mark.slow, pytest.mark.unreliable]


@pytest.fixture(scope="module")
def saturation_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import os

    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.db.session import dispose_engines

    running = start_stack(tmp_path_factory.mktemp("saturation"), overrides())
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(running.env)
    get_settings.cache_clear()
    try:
        yield running
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        dispose_engines()
        stop_stack(running)


@pytest.mark.timeout(1500)
def test_reextraction_through_the_stack_holds_the_limit_in_every_window(
    saturation_stack: Stack, tmp_path: Path
) -> None:
    result = measure_reextraction(saturation_stack, unique_slug("sat"), tmp_path / "docs", documents=300, chunks=3)
    summary = result.summary()
    print(f"\n[saturation] {summary}")
    for run in result.runs:
        print(f"[saturation] run {run.run_id[:8]} created {run.created:.1f} started {run.started} ended {run.ended} "
              f"steps { {k.rsplit('.', 1)[-1]: (round(a, 1), round(b, 1)) for k, (a, b) in run.steps.items()} }")
    assert result.calls >= 300 * 3
    assert len(result.windows.counts) >= 5, summary
    assert result.windows.lowest_share >= 0.9, summary
    assert result.busiest_1s <= 10, summary
    assert result.busiest_1s_first_second <= 10, summary
