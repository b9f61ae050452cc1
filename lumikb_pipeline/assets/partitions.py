"""The `documents` dynamic partitions: one partition per document id, kept in step with the app
database by `document_partitions_sensor`."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition

from lumikb_pipeline.core.names import DOCUMENTS_PARTITIONS

documents_partitions = DynamicPartitionsDefinition(name=DOCUMENTS_PARTITIONS)
