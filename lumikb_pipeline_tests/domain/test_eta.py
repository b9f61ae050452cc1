import random

import pytest

from lumikb_pipeline.domain.eta import active_finishes, eta_seconds, rate_per_second


def test_no_evidence_yet_means_no_rate_and_no_eta() -> None:
    assert rate_per_second([], now=100.0) is None
    assert rate_per_second([95.0, 96.0], now=100.0) is None  # two finishes are not a pace yet
    assert rate_per_second([100.0, 100.1, 100.2], now=100.3) is None  # nor a third of a second
    assert eta_seconds(50, None) is None


def test_a_steady_job_is_measured_at_its_pace() -> None:
    finishes = [float(t) for t in range(0, 120)]  # one a second for two minutes
    assert rate_per_second(finishes, now=119.5) == pytest.approx(1.0, rel=0.02)


def test_time_before_the_first_finish_is_not_counted() -> None:
    # The job was created at 0 and queued for 100 s; then 2 docs/s for 10 s.
    finishes = [100.0 + i * 0.5 for i in range(21)]
    assert rate_per_second(finishes, now=110.0) == pytest.approx(2.0, rel=0.02)


def test_a_slow_start_is_corrected_by_the_recent_window() -> None:
    # A backfill ramping up: 0.5/s for 40 s, then 3/s for 20 s (the 60-s window said ~1/s).
    slow = [i * 2.0 for i in range(20)]
    fast = [40.0 + i / 3 for i in range(60)]
    rate = rate_per_second(slow + fast, now=60.0)
    assert rate is not None and rate > 2.0, rate
    overall = (len(slow + fast) - 1) / 60.0
    assert rate > overall * 1.5


def test_a_batch_written_at_once_does_not_swing_the_rate() -> None:
    # Batches of 10 documents every 5 s = 2 docs/s; sampled just after and just before a batch.
    finishes = [10.0 + 5.0 * b + 0.01 * i for b in range(12) for i in range(10)]
    just_after = rate_per_second(finishes, now=65.2)
    just_before = rate_per_second(finishes[:-10], now=64.9)
    assert just_after is not None and just_before is not None
    assert 1.4 < just_before <= just_after < 2.6, (just_before, just_after)


def test_a_wait_the_job_has_already_shown_does_not_swing_the_rate() -> None:
    # Batches of 6 every 3 s, one of them 5 s late; sampled 4.5 s after the latest batch began (CI
    # once saw the ETA jump by a third here), and 7 s after it: a new longest gap, but not half again
    # the longest seen (CI once saw the ETA off by 36% there, while the job then ran faster than
    # before). A wait well past the longest gap seen lowers the rate.
    starts = [0.0, 3.0, 6.0, 9.0, 14.0, 17.0, 20.0]
    finishes = [s + 0.05 * i for s in starts for i in range(6)]
    settled = rate_per_second(finishes, now=20.5)
    waiting = rate_per_second(finishes, now=24.5)
    late = rate_per_second(finishes, now=27.0)
    stalled = rate_per_second(finishes, now=35.0)
    assert settled is not None and waiting is not None and late is not None and stalled is not None
    assert waiting == pytest.approx(settled)
    assert late == pytest.approx(settled)
    # 8 s after it the recent window (10 s) holds that batch alone: one batch is not a pace.
    alone = rate_per_second(finishes, now=28.0)
    assert alone is not None and 0.8 * settled <= alone <= settled, (alone, settled)
    assert stalled < settled * 0.8, (stalled, settled)


def test_a_paused_job_has_rate_zero_and_unknown_eta() -> None:
    finishes = [float(t) for t in range(0, 30)]
    rate = rate_per_second(finishes, now=500.0)
    assert rate == 0.0 and eta_seconds(10, rate) is None


def test_a_slow_job_is_not_taken_for_a_paused_one() -> None:
    finishes = [i * 90.0 for i in range(6)]  # one document every 90 s (large documents)
    assert rate_per_second(finishes, now=500.0) == pytest.approx(1 / 90.0)


def test_a_resumed_job_counts_only_finishes_since_it_resumed() -> None:
    old = [float(t) for t in range(0, 10)]
    resumed = [1000.0 + t * 0.5 for t in range(30)]
    assert active_finishes(old + resumed, 1015.0) == resumed
    assert rate_per_second(old + resumed, now=1015.0) == pytest.approx(2.0, rel=0.05)


def test_eta_is_remaining_over_rate_and_zero_when_done() -> None:
    assert eta_seconds(100, 2.0) == 50.0
    assert eta_seconds(0, None) == 0.0


def test_failed_documents_count_as_finished_work() -> None:
    # The caller passes succeeded and failed finishes alike: the rate measures finishing, not success.
    assert rate_per_second([100.0, 101.0, 102.0, 103.0], now=103.0) == pytest.approx(1.0)


def test_from_a_quarter_on_the_eta_is_within_30_percent_on_a_noisy_ramping_job() -> None:
    """A simulated 200-document job: runs ramp up over 20 s, then ~3 docs/s with jitter and bursts.
    (The fake-LLM version of this is lumikb_pipeline_tests/tracking/test_eta_honest.py.)"""
    rng = random.Random(7)
    t, finishes = 30.0, []
    while len(finishes) < 200:
        pace = 0.6 if t < 50 else 3.0
        burst = rng.randint(1, 3)
        t += rng.uniform(0.7, 1.3) * burst / pace
        finishes += [t + 0.01 * i for i in range(burst)]
    finishes = finishes[:200]
    end = finishes[-1]
    for done in range(50, 155, 5):  # from a quarter to three quarters
        now = finishes[done - 1] + 0.2
        rate = rate_per_second(finishes[:done], now)
        eta = eta_seconds(200 - done, rate)
        left = end - now
        achieved = (200 - done) / left
        assert rate is not None and eta is not None
        assert abs(eta - left) <= 0.3 * left + 2.0, (done, eta, left)
        assert abs(rate - achieved) <= 0.3 * achieved, (done, rate, achieved)
