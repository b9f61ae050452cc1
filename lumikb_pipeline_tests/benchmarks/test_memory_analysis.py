"""The memory benchmark's connection figures (`benchmarks.memory.connection_spread`), on samples."""

from __future__ import annotations

from benchmarks.memory import connection_spread


def test_connection_growth_is_the_change_of_medians_after_warm_up_per_server_and_redis_client() -> None:
    samples = [
        {"t": 0.0, "documents": 0, "postgres": 1, "redis": 2, "redis:celery": 2},  # warm-up: not counted
        *({"t": float(t), "documents": t, "postgres": 4, "redis": 10, "redis:celery": 4, "redis:lumikb": 2,
           "redis:lumikb-llm": 4} for t in range(10, 15)),
        # The second half: an LLM pool grown by one, and a child recycled (its pool not yet open again).
        *({"t": float(t), "documents": t, "postgres": 4, "redis": 7, "redis:celery": 4, "redis:lumikb": 2,
           "redis:lumikb-llm": 1} for t in (15, 16)),
        *({"t": float(t), "documents": t, "postgres": 4, "redis": 11, "redis:celery": 4, "redis:lumikb": 2,
           "redis:lumikb-llm": 5} for t in range(17, 20)),
        {"t": 20.0, "documents": 20, "postgres": 4, "redis": 6, "redis:celery": 4, "redis:lumikb": 2},
    ]
    spread = connection_spread(samples, warm_up_end_s=5.0)
    assert spread["postgres"] == {"min": 4, "max": 4, "last": 4, "growth": 0}
    assert spread["redis"]["growth"] == 1 and spread["redis"]["min"] == 6
    assert spread["redis:lumikb-llm"] == {"min": 0, "max": 5, "last": 0, "growth": 1}  # absent: none of it
    assert spread["redis:celery"]["growth"] == 0 and spread["redis:lumikb"]["growth"] == 0
    assert "neo4j" not in spread
