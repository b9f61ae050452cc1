"""Schedules. The drift check's cron lives in the app database so it can change at run time
(`drift_schedule`); `drift_check` builds the Dagster schedule from it when the definitions load."""

from lumikb_pipeline.schedules.drift_schedule import DriftSchedule, read_drift_schedule, validate_cron

__all__ = ["DriftSchedule", "read_drift_schedule", "validate_cron"]
