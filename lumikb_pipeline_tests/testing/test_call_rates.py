"""Counting LLM calls against the limit (`testing.call_rates`), as the saturation test and benchmarks do."""

from lumikb_pipeline.testing.call_rates import busiest_window, steady_windows


def test_a_job_at_the_limit_has_a_steady_share_of_one_whatever_its_last_partial_window() -> None:
    arrivals = [i / 10 for i in range(250)]  # 10 calls/s for 25 s
    windows = steady_windows(arrivals, limit_per_s=10)
    assert windows.counts == (100,)  # one whole 10-s window between the first and the last 10%
    assert abs(windows.mean_share - 1.0) < 0.01  # the calls after that window count too
    assert windows.lowest_share == 1.0


def test_a_gap_shows_in_the_lowest_window_and_the_mean() -> None:
    arrivals = [i / 10 for i in range(100)] + [20 + i / 10 for i in range(200)]  # 10 s idle in between
    windows = steady_windows(arrivals, limit_per_s=10)
    assert windows.lowest_share < 0.5
    assert 0.6 < windows.mean_share < 0.8
    assert busiest_window(arrivals) == 10


def test_no_calls_give_no_windows() -> None:
    windows = steady_windows([], limit_per_s=10)
    assert windows.counts == () and windows.mean_share == 0.0 and windows.lowest_share == 0.0
