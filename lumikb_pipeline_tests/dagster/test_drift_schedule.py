"""The drift check's schedule: cron maths, validation, storage, the Dagster schedule built on the stored
cron, and the CLI (the schedule's state in the Dagster instance)."""

from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lumikb_pipeline.core.errors import UsageError
from lumikb_pipeline.db.app_settings import read_drift_schedule, set_drift_cron, set_drift_enabled
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.cron import next_cron_time, validate_cron


def at(hour: int, minute: int = 0, second: int = 0, day: int = 1) -> datetime:
    return datetime(2025, 3, day, hour, minute, second, tzinfo=UTC)


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


def test_the_dagster_schedule_is_built_on_the_stored_cron_and_switch(sqlite_url: str, tmp_path: Path) -> None:
    from lumikb_pipeline.core.config import load_settings
    from lumikb_pipeline.schedules.drift_check import build_drift_check_schedule, stored_drift_schedule

    settings = load_settings().model_copy(update={"database_url": sqlite_url})
    default = build_drift_check_schedule(stored_drift_schedule(settings))
    assert (default.cron_schedule, default.execution_timezone) == ("0 2 * * *", "UTC")
    assert default.default_status.value == "RUNNING" and default.job_name == "drift_check_job"
    with session_scope(sqlite_url) as session:
        set_drift_cron(session, "*/5 * * * *")
        set_drift_enabled(session, False)
    changed = build_drift_check_schedule(stored_drift_schedule(settings))
    assert changed.cron_schedule == "*/5 * * * *" and changed.default_status.value == "STOPPED"
    assert "'*/5 * * * *'" in (changed.description or "")


def test_a_missing_app_database_gives_the_default_cron_and_is_not_created(tmp_path: Path) -> None:
    from lumikb_pipeline.core.config import load_settings
    from lumikb_pipeline.schedules.drift_check import stored_drift_schedule

    missing = tmp_path / "nowhere" / "lumikb.sqlite3"
    settings = load_settings().model_copy(update={"database_url": f"sqlite:///{missing}"})
    assert stored_drift_schedule(settings).cron == "0 2 * * *"
    assert not missing.exists()


def test_cli_set_cron_refuses_a_bad_cron_with_exit_2(lumikb_env: object) -> None:
    from lumikb_pipeline.cli import app

    result = CliRunner().invoke(app, ["schedule", "set-cron", "99 * * * *"])
    assert result.exit_code == 2
    assert "is not a cron expression" in result.output


def test_cli_schedule_round_trip_with_the_schedule_state_in_the_dagster_instance(lumikb_env: Path) -> None:
    from dagster import DagsterInstance
    from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType

    from lumikb_pipeline.cli import app

    runner = CliRunner()
    assert "'0 2 * * *' (UTC), enabled" in runner.invoke(app, ["schedule", "show"]).output
    # No webserver to reload: the cron is stored, and the command says when it applies.
    result = runner.invoke(app, ["schedule", "set-cron", "*/1 * * * *", "--webserver", "http://127.0.0.1:9"])
    assert result.exit_code == 0, result.output
    assert "no Dagster webserver answered" in result.output and "next loads" in result.output

    def state() -> InstigatorStatus:
        with DagsterInstance.from_config(str(lumikb_env / "dagster")) as instance:
            [stored] = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE)
                        if s.name == "drift_check_schedule"]
            return stored.status

    disabled = runner.invoke(app, ["schedule", "disable"])
    assert disabled.exit_code == 0, disabled.output
    assert "disabled" in disabled.output and "drift_check_schedule is stopped" in disabled.output
    assert state() == InstigatorStatus.STOPPED
    enabled = runner.invoke(app, ["schedule", "enable"])
    assert "'*/1 * * * *' (UTC), enabled" in enabled.output and "drift_check_schedule is running" in enabled.output
    assert state() == InstigatorStatus.RUNNING
