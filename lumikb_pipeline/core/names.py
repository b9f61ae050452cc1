"""Names shared by the Dagster definitions, the Celery workers, the CLI and the deployment files.

`docker-compose.yml`, `docs/operations.md` and the tests name these queues, pools and tags too; a
test checks that they agree with this module.
"""

from __future__ import annotations

from typing import Final, Literal

# The deterministic local extractor (`lumikb_pipeline.llm.offline`), the default model.
OFFLINE_MODEL: Final = "lumikb/offline"

# The dynamic partitions of `document_entities`: one per document, keyed by its readable `partition_key`
# (`legal/master-services-agreement-3f9c2a1b`: `domain.partition_keys`).
DOCUMENTS_PARTITIONS: Final = "documents"

# Celery queues (PRODUCT.md section 3).
QUEUE_DOCUMENT_PROCESSING: Final = "document_processing"
QUEUE_REPROCESSING: Final = "reprocessing"
QUEUES: Final = (QUEUE_DOCUMENT_PROCESSING, QUEUE_REPROCESSING)
Queue = Literal["document_processing", "reprocessing"]

# Dagster op-concurrency pools.
POOL_LLM: Final = "lumikb_llm"
POOL_GRAPH_WRITE: Final = "lumikb_graph_write"

# Dagster assets.
DOCUMENT_ENTITIES_ASSET: Final = "document_entities"
KNOWLEDGE_GRAPH_ASSET: Final = "knowledge_graph"

# Dagster jobs.
DOCUMENT_PROCESSING_JOB: Final = "document_processing_job"
REEXTRACTION_JOB: Final = "reextraction_job"
DRIFT_CHECK_JOB: Final = "drift_check_job"
GRAPH_INVARIANTS_JOB: Final = "graph_invariants_job"

# The ledger claimant of a run of `document_entities`: this prefix and the root run id (stable across
# the run's retries), and Dagster's tag that names a retry's root run.
CLAIMANT_PREFIX: Final = "dagster-run:"
ROOT_RUN_TAG: Final = "dagster/root_run_id"

# Run and backfill tags of our own.
TAG_JOB_ID: Final = "lumikb/job_id"
TAG_MODE: Final = "lumikb/mode"
TAG_SCHEMA_VERSION: Final = "lumikb/schema_version"
TAG_KB: Final = "lumikb/kb"
TAG_QUEUE: Final = "lumikb/queue"
TAG_TRIGGER: Final = "lumikb/trigger"
TAG_STRATEGY: Final = "lumikb/strategy"  # auto | full (schema evolution; absent: auto)

# Dagster's own tags that we set.
TAG_PRIORITY: Final = "dagster/priority"
TAG_MAX_RETRIES: Final = "dagster/max_retries"
TAG_RETRY_STRATEGY: Final = "dagster/retry_strategy"
TAG_MAX_RUNTIME: Final = "dagster/max_runtime"
TAG_BACKFILL: Final = "dagster/backfill"

# How long a job's state in Redis (progress, cancel flag, live spend) outlives its last update.
JOB_KEY_TTL_S: Final = 7 * 24 * 3600

# The Celery app the workers run (`celery -A ... worker`).
CELERY_APP_MODULE: Final = "lumikb_pipeline.orchestration.celery_app"
# The code location every Dagster process loads, under this name (workspace.yaml, `lumikb up`).
DEFINITIONS_MODULE: Final = "lumikb_pipeline.definitions"
LOCATION_NAME: Final = "lumikb_pipeline"
# The label the Dagster UI scopes runs by (job pages, the timeline): Dagster's hidden
# `.dagster/repository` tag, "<repository>@<location>"; a `Definitions` is the repository
# `__repository__`. Dagster sets it on runs it launches; runs executed in-process carry it from us.
TAG_REPOSITORY_LABEL: Final = ".dagster/repository"
REPOSITORY_LABEL: Final = f"__repository__@{LOCATION_NAME}"

# Run-time settings (`app_settings` table) of the drift-check schedule.
SETTING_DRIFT_CRON: Final = "drift_check.cron"
SETTING_DRIFT_ENABLED: Final = "drift_check.enabled"
DEFAULT_DRIFT_CRON: Final = "0 2 * * *"
