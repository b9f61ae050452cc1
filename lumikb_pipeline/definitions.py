"""The Dagster code location of lumikb_pipeline: the one place where assets, checks, jobs, sensors,
resources and the executor are wired (`dagster dev -m lumikb_pipeline.definitions`,
`dagster code-server start -m lumikb_pipeline.definitions`)."""

from __future__ import annotations

from dagster import Definitions

from lumikb_pipeline.assets import document_entities, graph_invariants, kb_schema_drift, knowledge_graph
from lumikb_pipeline.core import scrub
from lumikb_pipeline.core.names import QUEUE_REPROCESSING
from lumikb_pipeline.infra.executor import celery_executor_for
from lumikb_pipeline.jobs import document_processing_job, drift_check_job, graph_invariants_job, reextraction_job
from lumikb_pipeline.resources import (
    DatabaseResource,
    GraphStoreResource,
    LLMResource,
    RedisResource,
    ReextractionResource,
    StepOutputIOManager,
)
from lumikb_pipeline.schedules.drift_check import drift_check_schedule
from lumikb_pipeline.sensors import (
    document_partitions_sensor,
    graph_checks_sensor,
    job_status_sensor,
    schema_version_sensor,
)

# Every process that loads the definitions (code server, run workers, Celery workers, the daemon's
# sensors) scrubs secrets from every log record, so none reaches a log file or the event log.
scrub.install()

defs = Definitions(
    assets=[document_entities, knowledge_graph, kb_schema_drift],
    asset_checks=[graph_invariants],
    jobs=[document_processing_job, reextraction_job, drift_check_job, graph_invariants_job],
    sensors=[document_partitions_sensor, schema_version_sensor, job_status_sensor, graph_checks_sensor],
    schedules=[drift_check_schedule],
    resources={
        "database": DatabaseResource(),
        "graph_store": GraphStoreResource(),
        "llm": LLMResource(),
        "redis": RedisResource(),
        "reextraction": ReextractionResource(),
        # The outcome lists handed from extract to write go through the app database, not a folder
        # every machine would have to share (docs/scaling.md, "Several machines").
        "io_manager": StepOutputIOManager(),
    },
    # Runs Dagster builds itself (backfills launched from the UI) are re-extraction work.
    executor=celery_executor_for(QUEUE_REPROCESSING),
)
