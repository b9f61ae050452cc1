"""A re-extraction through the whole stack keeps the provider's limit saturated (issue 13, point 1).

Schema change -> the schema-version sensor -> backfill -> runs on `reprocessing` via dagster-celery, against
the fake LLM server, in the issue's configuration: limit 20/s, latency 0.5-1.5 s, batches of 25 (the
default), documents of 5 chunks, the in-flight cap's default (5·R = 100). At the server, every 10-s window
from the first to the last 10% of the job's calls holds at least 90% of the limit, and no 1-s window
holds more than the limit, the job's first second included.

Its own stack (its own limit and in-flight cap): it must not share the machine with another stack. The
fake server runs at real-time priority (`raise_priority`), so its arrival times are when requests came.

Marked unreliable, so no step of `scripts/test` runs it: it passes some runs and misses by little
in others, and it takes about 10 minutes, which the whole suite's 60 cannot hold. Run it with
`pytest -m slow lumikb_pipeline_tests/saturation` on a quiet machine. On 2026-12-01 and 12-02
(docs/benchmarks.md, "What was left"), runs of this measurement held lowest 10-s windows of 72-90%
before extraction ahead started while a step's last answers were out, and of 88% and 12% (this test:
the pause before the runs that then extracted the job's last batches themselves) after; with no
margin left to the runs, 89% and 89.5% (this test; 1-2 calls under 90%: slots the sender gave up on
the busy 2 CPUs), and 90.5% through `benchmarks/run`.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from lumikb_pipeline_tests.dagster.saturation import measure_reextraction, overrides
from lumikb_pipeline_tests.dagster.stack import Stack, start_stack, stop_stack, unique_slug

pytestmark = [pytest.mark.slow, pytest.mark.unreliable]

LIMIT_PER_S = 20


@pytest.fixture(scope="module")
def saturation_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import os

    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.db.session import dispose_engines

    running = start_stack(tmp_path_factory.mktemp("saturation"), overrides({
        "LUMIKB_LLM_RATE_LIMIT": f"{LIMIT_PER_S}/s", "LUMIKB_REEXTRACT_BATCH_SIZE": "25",
    }))
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
    documents, chunks = 1000, 5
    result = measure_reextraction(saturation_stack, unique_slug("sat"), tmp_path / "docs", documents=documents,
                                  chunks=chunks, latency_mean_s=1.0, latency_jitter_s=0.5)
    summary = result.summary()
    print(f"\n[saturation] {summary}")
    for run in result.runs:
        print(f"[saturation] run {run.run_id[:8]} created {run.created:.1f} started {run.started} ended {run.ended} "
              f"steps { {k.rsplit('.', 1)[-1]: (round(a, 1), round(b, 1)) for k, (a, b) in run.steps.items()} }")
    assert result.calls >= documents * chunks
    assert len(result.windows.counts) >= 8, summary
    assert result.windows.lowest_share >= 0.9, summary
    assert result.busiest_1s <= LIMIT_PER_S, summary
    assert result.busiest_1s_first_second <= LIMIT_PER_S, summary
