"""Dagster schedules, one a file: the schema-drift check on a cron changed at run time."""

from lumikb_pipeline.schedules.drift_check import drift_check_schedule

__all__ = ["drift_check_schedule"]
