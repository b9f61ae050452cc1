"""The schema-drift check's schedule: a cron (UTC) and an on/off switch, kept in `app_settings`.

`lumikb schedule set-cron|enable|disable` writes it; `schedules.drift_check` builds the Dagster
schedule `drift_check_schedule` from it when the definitions load. Default: daily at 02:00.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from croniter import CroniterBadCronError, croniter
from sqlalchemy import select
from sqlalchemy.orm import Session

from lumikb_pipeline.db.models import AppSetting, utcnow
from lumikb_pipeline.errors import UsageError
from lumikb_pipeline.orchestration.names import DEFAULT_DRIFT_CRON, SETTING_DRIFT_CRON, SETTING_DRIFT_ENABLED

CRON_HELP = (
    "write five fields 'minute hour day-of-month month day-of-week' (UTC), "
    "e.g. '0 2 * * *' for daily at 02:00 or '*/15 * * * *' for every 15 minutes"
)


@dataclass(frozen=True)
class DriftSchedule:
    """The drift check's cron and whether it is on, and when each was last changed."""

    cron: str = DEFAULT_DRIFT_CRON
    enabled: bool = True
    updated_at: datetime | None = None

    def next_tick(self, after: datetime) -> datetime:
        """The first cron time strictly after `after`."""
        return next_cron_time(self.cron, after)


def validate_cron(cron: str) -> str:
    """The cron, normalised; UsageError (exit 2) with the accepted form when it is not one."""
    text = " ".join(cron.split())
    if len(text.split(" ")) != 5:
        raise UsageError(f"{cron!r} is not a cron expression: {CRON_HELP}")
    try:
        if not croniter.is_valid(text):
            raise ValueError(text)
        croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterBadCronError, ValueError, KeyError) as exc:
        raise UsageError(f"{cron!r} is not a cron expression: {CRON_HELP}") from exc
    return text


def next_cron_time(cron: str, after: datetime) -> datetime:
    """The first time of `cron` (UTC) strictly after `after`."""
    return croniter(cron, after.astimezone(UTC)).get_next(datetime).astimezone(UTC)


def _get(session: Session, key: str) -> AppSetting | None:
    return session.scalar(select(AppSetting).where(AppSetting.key == key))


def read_drift_schedule(session: Session) -> DriftSchedule:
    """The stored schedule, with defaults for what was never set."""
    cron_row = _get(session, SETTING_DRIFT_CRON)
    enabled_row = _get(session, SETTING_DRIFT_ENABLED)
    stamps = [row.updated_at for row in (cron_row, enabled_row) if row is not None]
    return DriftSchedule(
        cron=cron_row.value if cron_row is not None else DEFAULT_DRIFT_CRON,
        enabled=enabled_row.value.lower() != "false" if enabled_row is not None else True,
        updated_at=max(stamps) if stamps else None,
    )


def _put(session: Session, key: str, value: str) -> None:
    row = _get(session, key)
    if row is None:
        session.add(AppSetting(key=key, value=value, updated_at=utcnow()))
    else:
        row.value = value
        row.updated_at = utcnow()


def set_drift_cron(session: Session, cron: str) -> DriftSchedule:
    """Store a new cron (validated); it applies from the sensor's next tick."""
    _put(session, SETTING_DRIFT_CRON, validate_cron(cron))
    session.flush()
    return read_drift_schedule(session)


def set_drift_enabled(session: Session, enabled: bool) -> DriftSchedule:
    """Turn the drift check on or off."""
    _put(session, SETTING_DRIFT_ENABLED, "true" if enabled else "false")
    session.flush()
    return read_drift_schedule(session)
