from lumikb_pipeline.domain.eta import eta_seconds, rate_per_second


def test_no_progress_yet_has_no_rate_and_no_eta() -> None:
    assert rate_per_second([], now=100.0, started_at=90.0) == 0.0
    assert eta_seconds(50, 0.0) is None


def test_rate_is_measured_over_the_recent_window() -> None:
    finishes = [float(t) for t in range(0, 120)]  # one a second for two minutes
    assert rate_per_second(finishes, now=119.5, started_at=0.0, window_s=60) == 60 / 60


def test_a_young_job_is_measured_since_its_start_not_over_the_whole_window() -> None:
    finishes = [100.0 + i * 0.5 for i in range(20)]  # 2/s for 10 s
    assert rate_per_second(finishes, now=110.0, started_at=100.0, window_s=60) == 2.0


def test_a_paused_job_has_rate_zero_and_unknown_eta() -> None:
    finishes = [float(t) for t in range(0, 30)]
    rate = rate_per_second(finishes, now=500.0, started_at=0.0, window_s=60)
    assert rate == 0.0 and eta_seconds(10, rate) is None


def test_a_restarted_job_counts_only_finishes_since_it_resumed() -> None:
    old = [float(t) for t in range(0, 10)]
    resumed = [1000.0 + t for t in range(30)]
    assert rate_per_second(old + resumed, now=1030.0, started_at=0.0, window_s=60) == 30 / 60


def test_eta_is_remaining_over_rate_and_zero_when_done() -> None:
    assert eta_seconds(100, 2.0) == 50.0
    assert eta_seconds(0, 0.0) == 0.0


def test_all_failed_still_counts_as_progress() -> None:
    # Failed documents are finished too: the rate measures finishing, not success.
    finishes = [100.0, 101.0, 102.0]
    assert rate_per_second(finishes, now=103.0, started_at=100.0) == 1.0
    assert eta_seconds(0, 1.0) == 0.0


def test_a_burst_right_at_the_start_is_not_an_absurd_rate() -> None:
    assert rate_per_second([100.0, 100.01], now=100.02, started_at=100.0) == 2.0
