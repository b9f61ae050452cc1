"""Sensors, one a file: partitions in step with the database, re-extraction on schema changes,
the drift check on its run-time cron, and job status."""

from lumikb_pipeline.sensors.document_partitions import document_partitions_sensor
from lumikb_pipeline.sensors.drift_check import drift_check_sensor
from lumikb_pipeline.sensors.graph_checks import graph_checks_sensor
from lumikb_pipeline.sensors.job_status import job_status_sensor
from lumikb_pipeline.sensors.schema_version import schema_version_sensor

__all__ = [
    "document_partitions_sensor", "drift_check_sensor", "graph_checks_sensor", "job_status_sensor",
    "schema_version_sensor",
]
