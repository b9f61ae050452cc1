"""Bad usage of the job commands: exit code 2 and a message that says what to do."""

from pathlib import Path

from typer.testing import CliRunner

from lumikb_pipeline.cli import app

runner = CliRunner()


def test_progress_of_an_unknown_job_says_where_job_ids_come_from(lumikb_env: Path) -> None:
    result = runner.invoke(app, ["progress", "no-such-job", "--json"])
    assert result.exit_code == 2
    assert "job 'no-such-job' does not exist" in result.output and "lumikb reextract" in result.output


def test_cancel_of_an_unknown_job_says_where_job_ids_come_from(lumikb_env: Path) -> None:
    result = runner.invoke(app, ["cancel", "no-such-job"])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "lumikb reextract" in result.output


def test_a_negative_budget_is_refused_with_an_example(lumikb_env: Path) -> None:
    result = runner.invoke(app, ["reextract", "demo", "--max-cost", "-1"])
    assert result.exit_code == 2
    assert "negative" in result.output and "--max-cost 5" in result.output


def test_reextract_of_an_unknown_kb_says_how_to_create_it(lumikb_env: Path) -> None:
    result = runner.invoke(app, ["reextract", "nope", "--dry-run"])
    assert result.exit_code == 2
    assert "lumikb kb create nope" in result.output


def test_a_bad_slug_for_drift_states_the_rule(lumikb_env: Path) -> None:
    result = runner.invoke(app, ["drift", "Not_A_Slug", "--json"])
    assert result.exit_code == 2
    assert "lowercase" in result.output


def test_reextract_with_nothing_outdated_starts_no_job(lumikb_env: Path) -> None:
    from sqlalchemy import func, select

    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.db.models import Job
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.demo import SCHEMA_V1

    assert runner.invoke(app, ["kb", "create", "empty", "--schema", str(SCHEMA_V1)]).exit_code == 0
    result = runner.invoke(app, ["reextract", "empty"])
    assert result.exit_code == 0, result.output
    assert "nothing to re-extract: no document of empty is outdated; no job was started" in result.output
    with session_scope(get_settings().effective_database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
