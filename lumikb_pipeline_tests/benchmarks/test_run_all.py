"""`benchmarks/run --quick` runs every benchmark and reports every figure with its target.

The values are the benchmarks' business (docs/benchmarks.md); this checks that each figure is there,
and that the LLM-throughput benchmark's own JSON holds both designs (its quick run is the small run
that benchmark had a test of its own for).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run_all import BENCHMARKS, result_path
from lumikb_pipeline_tests.conftest import required_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.benchmark
@pytest.mark.timeout(1260)  # the run's own limit below, not the suite's 600 s per test
def test_benchmarks_run_reports_every_figure_with_its_target(tmp_path: Path) -> None:
    required_env("LUMIKB_NEO4J_URI")
    required_env("LUMIKB_REDIS_URL")
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [str(REPO / "benchmarks" / "run"), "--quick", "--output", str(summary)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "lumikb_pipeline benchmarks" in run.stdout
    result = json.loads(summary.read_text())
    expected = [figure.name for benchmark in BENCHMARKS for figure in benchmark.figures]
    assert result["figure_names"] == expected
    rows = {row["figure"]: row for row in result["figures"]}
    assert set(rows) == set(expected)
    for name, row in rows.items():
        assert row["error"] is None, name
        assert isinstance(row["value"], int | float), name
        assert row["met"] in (True, False, None) and row["comparator"] in (">=", "<=", ">"), name
        assert row["met"] is None or row["target"] is not None, name

    llm = json.loads(result_path("llm_throughput", quick=True).read_text())
    assert {"chunks", "workers", "rate_limit_per_s", "ours", "plain", "ours_share_of_limit", "speedup_vs_plain",
            "target_met"} <= set(llm)
    for design in ("ours", "plain"):
        assert {"chunks_succeeded", "llm_calls", "elapsed_s", "calls_per_s", "chunks_per_s",
                "busiest_1s_window"} <= set(llm[design])
    assert llm["ours"]["chunks_succeeded"] == 60 and llm["ours"]["chunks_failed"] == 0
    assert llm["ours"]["busiest_1s_window"] <= llm["rate_limit_per_s"]
    assert llm["speedup_vs_plain"] > 2
