"""The drift check's schedule: cron due-time maths, validation, storage, the sensor and the CLI."""

from datetime import UTC, datetime, timedelta

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context
from typer.testing import CliRunner

from lumikb_pipeline.core.errors import UsageError
from lumikb_pipeline.db.app_settings import read_drift_schedule, set_drift_cron, set_drift_enabled
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.cron import due_tick, next_cron_time, validate_cron


def at(hour: int, minute: int = 0, second: int = 0, day: int = 1) -> datetime:
    return datetime(2025, 3, day, hour, minute, second, tzinfo=UTC)


def test_a_cron_time_passed_since_the_last_handled_one_is_due() -> None:
    assert due_tick("0 2 * * *", at(1), at(2, 0, 30)) == at(2)


def test_a_tick_exactly_now_is_due() -> None:
    assert due_tick("0 2 * * *", at(1), at(2)) == at(2)


def test_nothing_is_due_before_the_next_cron_time() -> None:
    assert due_tick("0 2 * * *", at(2), at(3)) is None
    assert due_tick("0 2 * * *", at(2), at(2)) is None


def test_after_a_pause_only_the_latest_missed_time_is_due() -> None:
    assert due_tick("*/1 * * * *", at(2), at(2, 5, 10)) == at(2, 5)
    assert due_tick("0 2 * * *", at(2, day=1), at(3, day=4)) == at(2, day=4)


def test_a_changed_cron_applies_from_the_last_handled_time() -> None:
    # Handled 02:00 daily, then set to every minute at 09:30:20: the 09:30 tick is due at once.
    assert due_tick("*/1 * * * *", at(2), at(9, 30, 20)) == at(9, 30)


def test_next_cron_time_is_strictly_after() -> None:
    assert next_cron_time("0 2 * * *", at(2)) == at(2, day=2)


@pytest.mark.parametrize("cron", ["61 * * * *", "* * *", "every day", "0 2 * * * *", ""])
def test_bad_crons_are_refused_with_the_accepted_form(cron: str) -> None:
    with pytest.raises(UsageError, match=r"minute hour day-of-month month day-of-week.*e\.g\. '0 2 \* \* \*'"):
        validate_cron(cron)


def test_crons_are_normalised() -> None:
    assert validate_cron("  */5   *  * * * ") == "*/5 * * * *"


def test_schedule_is_stored_in_app_settings(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        assert read_drift_schedule(session).cron == "0 2 * * *"
        assert read_drift_schedule(session).enabled
        set_drift_cron(session, "*/1 * * * *")
        set_drift_enabled(session, False)
    with session_scope(sqlite_url) as session:
        schedule = read_drift_schedule(session)
    assert (schedule.cron, schedule.enabled) == ("*/1 * * * *", False)
    assert schedule.updated_at is not None


def _tick(sqlite_url: str, cursor: str | None) -> SensorResult:
    from lumikb_pipeline.resources import DatabaseResource
    from lumikb_pipeline.sensors.drift_check import drift_check_sensor

    with DagsterInstance.ephemeral() as instance:
        context = build_sensor_context(instance=instance, cursor=cursor,
                                       resources={"database": DatabaseResource(database_url=sqlite_url)})
        result = drift_check_sensor(context)
    assert isinstance(result, SensorResult)
    return result


def test_the_sensor_fires_once_per_cron_time_with_the_time_as_run_key(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        set_drift_cron(session, "*/1 * * * *")
    first = _tick(sqlite_url, None)  # first tick ever: start counting from now
    assert not first.run_requests and first.cursor
    two_minutes_ago = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
    fired = _tick(sqlite_url, two_minutes_ago)
    assert fired.run_requests and len(fired.run_requests) == 1
    request = fired.run_requests[0]
    tick = datetime.fromisoformat(request.tags["lumikb/drift_tick"])
    assert request.run_key == f"drift:{tick.isoformat()}" and tick.second == 0
    assert fired.cursor == tick.isoformat()
    again = _tick(sqlite_url, fired.cursor)
    assert not again.run_requests or datetime.fromisoformat(again.run_requests[0].tags["lumikb/drift_tick"]) > tick


def test_the_disabled_schedule_fires_nothing_and_keeps_no_backlog(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        set_drift_cron(session, "*/1 * * * *")
        set_drift_enabled(session, False)
    result = _tick(sqlite_url, (datetime.now(UTC) - timedelta(hours=1)).isoformat())
    assert not result.run_requests
    assert datetime.fromisoformat(str(result.cursor)) > datetime.now(UTC) - timedelta(minutes=1)


def test_cli_set_cron_refuses_a_bad_cron_with_exit_2(lumikb_env: object) -> None:
    from lumikb_pipeline.cli import app

    result = CliRunner().invoke(app, ["schedule", "set-cron", "99 * * * *"])
    assert result.exit_code == 2
    assert "is not a cron expression" in result.output


def test_cli_schedule_round_trip(lumikb_env: object) -> None:
    from lumikb_pipeline.cli import app

    runner = CliRunner()
    assert "'0 2 * * *' (UTC), enabled" in runner.invoke(app, ["schedule", "show"]).output
    result = runner.invoke(app, ["schedule", "set-cron", "*/1 * * * *"])
    assert result.exit_code == 0, result.output
    assert "disabled" in runner.invoke(app, ["schedule", "disable"]).output
    assert "'*/1 * * * *' (UTC), enabled" in runner.invoke(app, ["schedule", "enable"]).output
