"""Sensors, one a file: partitions in step with the database, re-extraction on schema changes,
job status, and the graph checks after jobs."""

from lumikb_pipeline.sensors.document_partitions import document_partitions_sensor
from lumikb_pipeline.sensors.graph_checks import graph_checks_sensor
from lumikb_pipeline.sensors.job_status import job_status_sensor
from lumikb_pipeline.sensors.schema_version import schema_version_sensor

__all__ = ["document_partitions_sensor", "graph_checks_sensor", "job_status_sensor", "schema_version_sensor"]
