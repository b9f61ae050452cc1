"""Run-time settings kept in the `app_settings` table: the schema-drift check's schedule, a cron (UTC)
and an on/off switch.

`lumikb schedule set-cron|enable|disable` writes it; `schedules.drift_check` builds the Dagster
schedule `drift_check_schedule` from it when the definitions load. Default: daily at 02:00.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from lumikb_pipeline.core.names import DEFAULT_DRIFT_CRON, SETTING_DRIFT_CRON, SETTING_DRIFT_ENABLED
from lumikb_pipeline.db.models import AppSetting, utcnow
from lumikb_pipeline.domain.cron import next_cron_time, validate_cron


@dataclass(frozen=True)
class DriftSchedule:
    """The drift check's cron and whether it is on, and when each was last changed."""

    cron: str = DEFAULT_DRIFT_CRON
    enabled: bool = True
    updated_at: datetime | None = None

    def next_tick(self, after: datetime) -> datetime:
        """The first cron time strictly after `after`."""
        return next_cron_time(self.cron, after)


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
