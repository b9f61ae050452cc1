"""The graph-write benchmark runs end to end at a small size and writes its JSON result.

Timing targets are checked by reading the full run's numbers (docs/benchmarks.md), never here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lumikb_pipeline_tests.conftest import required_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.benchmark
def test_graph_write_benchmark_compares_batched_and_naive_writers(tmp_path: Path) -> None:
    required_env("LUMIKB_NEO4J_URI")
    output = tmp_path / "graph_writes.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.graph_writes", "--documents", "6", "--naive-documents", "4", "--rounds", "2",
         "--workers", "2", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "faster than naive" in run.stdout and "of the lower bound" in run.stdout
    assert "of the idempotent bound" in run.stdout

    result = json.loads(output.read_text())
    assert result["config"] == {
        "documents": 6, "naive_documents": 4, "rounds": 2, "chunks_per_document": 5, "entities": 300,
        "relationships": 600, "workers": 2, "block": 20,
    }
    for writer, documents in (("store", 6), ("idempotent_bound", 6), ("lower_bound", 6), ("naive", 4)):
        row = result[writer]
        assert set(row) == {"seconds", "documents", "documents_per_s", "entities_per_s", "cpu_ms_per_document",
                            "rounds", "graph"}
        assert row["documents"] == documents and len(row["rounds"]) == 2
        # The client's CPU is always measured; Neo4j's here too, since scripts/services runs it on this machine.
        assert row["cpu_ms_per_document"]["client"] > 0 and row["cpu_ms_per_document"]["neo4j"] > 0
        assert row["entities_per_s"]["min"] <= row["entities_per_s"]["median"] <= row["entities_per_s"]["max"]
        assert row["graph"]["entities"] == 50 * documents and row["graph"]["relationships"] == 100 * documents
    assert result["neo4j"].startswith("Neo4j/5.")
    assert set(result["machine"]["load_average_1m"]) == {"before", "after"}
    assert result["ratio"] > 1
    assert 0 < result["share_of_lower_bound"]
    assert 0 < result["share_of_idempotent_bound"] and 0 < result["idempotent_bound_share_of_lower_bound"]
