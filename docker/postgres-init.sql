-- The second database of the postgres service: Dagster's storage (runs, events, schedules).
CREATE DATABASE lumikb_dagster OWNER lumikb;
