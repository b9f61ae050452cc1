"""Schedules. The drift check's cron lives in the app database so it can change at run time (see
`drift_schedule`); `drift_check_sensor` is what fires it."""

from lumikb_pipeline.schedules.drift_schedule import DriftSchedule, due_tick, read_drift_schedule, validate_cron

__all__ = ["DriftSchedule", "due_tick", "read_drift_schedule", "validate_cron"]
