"""`reextract` arguments and jobs that used to be accepted or hang (issue 15)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from lumikb_pipeline.cli import app
from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.core.errors import UsageError
from lumikb_pipeline.db.models import ExtractionRecord, Job, JobStatus
from lumikb_pipeline.db.session import session_scope

runner = CliRunner()
SCHEMA = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo" / "schema_v1.yaml"


@pytest.mark.parametrize("budget", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_budget_that_is_not_a_number_is_refused(lumikb_env: Path, budget: str) -> None:
    result = runner.invoke(app, ["reextract", "demo", "--max-cost", budget])
    assert result.exit_code == 2, result.output
    assert "--max-cost" in result.output


def _kb_with_a_document(tmp_path: Path) -> None:
    assert runner.invoke(app, ["kb", "create", "k", "--schema", str(SCHEMA)]).exit_code == 0
    doc = tmp_path / "a.md"
    doc.write_text("Acme Corp hired Jane Doe in Berlin.")
    assert runner.invoke(app, ["ingest", "k", str(doc)]).exit_code == 0


@pytest.mark.slow  # waits for runs that never start: out of the fast step
def test_reextract_wait_without_daemon_or_workers_says_what_to_start(lumikb_env: Path, tmp_path: Path) -> None:
    _kb_with_a_document(tmp_path)
    started = time.monotonic()
    result = runner.invoke(app, ["reextract", "k", "--all", "--wait", "--idle-timeout", "2"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert "the Dagster daemon" in result.output and "Celery worker" in result.output
    assert "lumikb up" in result.output
    assert elapsed < 60


def test_a_second_job_on_a_document_of_a_running_job_is_refused_and_the_first_keeps_it(
    lumikb_env: Path, tmp_path: Path
) -> None:
    from lumikb_pipeline.reextraction.service import Selection, start_reextraction

    _kb_with_a_document(tmp_path)
    settings = load_settings()
    first = start_reextraction(settings, "k", Selection.all(), launch=False)
    assert first.status == JobStatus.RUNNING
    with pytest.raises(UsageError) as error:
        start_reextraction(settings, "k", Selection.all(), launch=False)
    assert first.id in str(error.value) and "lumikb cancel" in str(error.value)
    with session_scope(settings.effective_database_url) as session:
        owners = set(session.scalars(select(ExtractionRecord.job_id)))
        jobs = session.scalars(select(Job.id)).all()
    assert owners == {first.id}
    assert jobs == [first.id]  # the refused job was not recorded
    # Once the first job has ended, the document can be re-extracted again.
    with session_scope(settings.effective_database_url) as session:
        session.get_one(Job, first.id).status = JobStatus.CANCELLED
    second = start_reextraction(settings, "k", Selection.all(), launch=False)
    with session_scope(settings.effective_database_url) as session:
        assert set(session.scalars(select(ExtractionRecord.job_id))) == {second.id}


def test_the_ledger_never_hands_a_row_of_a_running_job_to_another(lumikb_env: Path, tmp_path: Path) -> None:
    from lumikb_pipeline.db import ledger
    from lumikb_pipeline.reextraction.service import Selection, start_reextraction

    _kb_with_a_document(tmp_path)
    settings = load_settings()
    first = start_reextraction(settings, "k", Selection.all(), launch=False)
    with session_scope(settings.effective_database_url) as session:
        row = session.scalars(select(ExtractionRecord)).one()
        other = Job(kb_id=row.kb_id, target_schema_version=1, mode=first.mode, selection={}, trigger=first.trigger,
                    status=JobStatus.RUNNING, total_documents=1)
        session.add(other)
        session.flush()
        ledger.ensure_records(session, row.kb_id, [row.document_id], 1, other.id, redo_succeeded=True)
        assert not ledger.claim(session, row.document_id, 1, "worker-b", other.id)
        session.refresh(row)
        assert row.job_id == first.id and row.status.value == "pending"
