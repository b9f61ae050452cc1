"""The Dagster jobs, one per kind of work and queue (PRODUCT.md section 3).

The same `document_entities` ops serve both queues, and dagster-celery takes a step's queue from
its op tags only (run tags are not read), so the queue is chosen per *job*, by the executor's
`task_default_queue`: `document_processing_job` sends its steps to `document_processing`, and
everything on `reprocessing` (re-extraction jobs, backfills launched from the UI, the drift
check) uses the reprocessing executor, which is also the default for the asset jobs Dagster
builds for backfills.
"""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from lumikb_pipeline.assets import KNOWLEDGE_GRAPH, document_entities, kb_schema_drift
from lumikb_pipeline.core.names import (
    DOCUMENT_PROCESSING_JOB,
    DRIFT_CHECK_JOB,
    GRAPH_INVARIANTS_JOB,
    QUEUE_DOCUMENT_PROCESSING,
    QUEUE_REPROCESSING,
    REEXTRACTION_JOB,
)
from lumikb_pipeline.infra.executor import celery_executor_for
from lumikb_pipeline.infra.tags import document_processing_tags, reextraction_tags, reprocessing_tags

document_processing_job = define_asset_job(
    DOCUMENT_PROCESSING_JOB,
    selection=AssetSelection.assets(document_entities).without_checks(),
    executor_def=celery_executor_for(QUEUE_DOCUMENT_PROCESSING),
    tags=document_processing_tags(),
    description="Normal processing of new and changed documents, on the `document_processing` queue.",
)

reextraction_job = define_asset_job(
    REEXTRACTION_JOB,
    selection=AssetSelection.assets(document_entities).without_checks(),
    executor_def=celery_executor_for(QUEUE_REPROCESSING),
    tags=reextraction_tags(),
    description="Re-extraction of documents, on the `reprocessing` queue (batched by the backfill policy).",
)

drift_check_job = define_asset_job(
    DRIFT_CHECK_JOB,
    selection=AssetSelection.assets(kb_schema_drift) | AssetSelection.checks_for_assets(KNOWLEDGE_GRAPH),
    executor_def=celery_executor_for(QUEUE_REPROCESSING),
    tags=reprocessing_tags(),
    description="The schema-drift check and the graph invariant checks, on the `reprocessing` queue.",
)

graph_invariants_job = define_asset_job(
    GRAPH_INVARIANTS_JOB,
    selection=AssetSelection.checks_for_assets(KNOWLEDGE_GRAPH),
    executor_def=celery_executor_for(QUEUE_REPROCESSING),
    tags=reprocessing_tags(),
    description="The graph invariant checks alone, on the `reprocessing` queue.",
)

__all__ = ["document_processing_job", "drift_check_job", "graph_invariants_job", "reextraction_job"]
