"""`drift_check_schedule`: the schema-drift check as a Dagster schedule, on a cron changed at run time.

The cron and the on/off switch are stored in the app database (`app_settings`, written by `lumikb
schedule`). The definitions read them when the code location loads: the schedule is built with the
stored cron, and its default status follows the switch. `lumikb schedule set-cron` stores the new
cron and reloads the code location through the Dagster webserver's API, so the webserver shows the
new cron at once and the daemon (which refreshes its workspace every minute) ticks on it; `enable`
and `disable` start and stop the schedule in the Dagster instance. No redeploy, no restart.

Reading the database never creates it: when it is missing or unreadable (a process without the
app database, e.g. a unit test loading the definitions) the default cron applies.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dagster import DefaultScheduleStatus, ScheduleDefinition
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from lumikb_pipeline.core.config import Settings, get_settings
from lumikb_pipeline.core.names import TAG_TRIGGER
from lumikb_pipeline.db.app_settings import DriftSchedule, read_drift_schedule
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.jobs import drift_check_job

SCHEDULE_NAME = "drift_check_schedule"
log = logging.getLogger(__name__)


def stored_drift_schedule(settings: Settings) -> DriftSchedule:
    """The stored cron and switch, or the defaults when the app database is missing or unreadable."""
    url = settings.effective_database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        return DriftSchedule()
    try:
        with session_scope(url) as session:
            return read_drift_schedule(session)
    except SQLAlchemyError as exc:
        log.warning("drift_check_schedule: the app database cannot be read (%s); using the default cron",
                    type(exc).__name__)
        return DriftSchedule()


def build_drift_check_schedule(schedule: DriftSchedule) -> ScheduleDefinition:
    """The schedule for a stored cron and switch."""
    return ScheduleDefinition(
        name=SCHEDULE_NAME,
        job=drift_check_job,
        cron_schedule=schedule.cron,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING if schedule.enabled else DefaultScheduleStatus.STOPPED,
        tags={TAG_TRIGGER: "schedule"},
        description=(
            f"Runs the schema-drift check and the graph invariant checks at '{schedule.cron}' (UTC); "
            "change it with `lumikb schedule set-cron`."
        ),
    )


drift_check_schedule = build_drift_check_schedule(stored_drift_schedule(get_settings()))
