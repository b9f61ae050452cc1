"""The memory benchmark's connection figures (`benchmarks.memory.connection_spread`), on samples."""

from __future__ import annotations

from benchmarks.memory import connection_spread


def test_connection_growth_per_server_and_redis_client_after_warm_up() -> None:
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
    assert spread["postgres"] == {"min": 4, "max": 4, "last": 4, "peak_growth": 0, "median_growth": 0}
    assert spread["redis"]["peak_growth"] == 1 and spread["redis"]["median_growth"] == 1
    assert spread["redis"]["min"] == 6
    assert spread["redis:lumikb-llm"] == {  # absent from a sample: none of it
        "min": 0, "max": 5, "last": 0, "peak_growth": 1, "median_growth": 1}
    assert spread["redis:celery"]["peak_growth"] == 0 and spread["redis:lumikb"]["peak_growth"] == 0
    assert "neo4j" not in spread


def test_a_busier_second_half_is_no_growth_and_a_leak_is() -> None:
    # Counts that follow the steps in flight (2 idle, 12 with every child busy): the second half is
    # busier, so its median is higher, but it never holds more than the first half's peak.
    busy = [2, 12, 8, 2, 12, 4, 8, 12, 12, 8, 12, 12]
    samples = [{"t": float(t), "documents": t, "postgres": n} for t, n in enumerate(busy)]
    spread = connection_spread(samples, warm_up_end_s=0.0)["postgres"]
    assert spread["peak_growth"] == 0 and spread["median_growth"] > 0

    # One connection kept by every recycled child: each peak stands higher than the one before.
    leaking = [2 + t // 2 + (8 if t % 2 else 0) for t in range(12)]
    samples = [{"t": float(t), "documents": t, "postgres": n} for t, n in enumerate(leaking)]
    assert connection_spread(samples, warm_up_end_s=0.0)["postgres"]["peak_growth"] > 0
