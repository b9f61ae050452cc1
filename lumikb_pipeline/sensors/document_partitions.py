"""`document_partitions_sensor`: fires every few seconds; adds a `documents` partition for each new
document, removes the graph contribution and the partition of each deleted one, and launches
`document_processing_job` runs (batches of consecutive partitions, `document_processing` queue)
for new and changed documents."""


import time
from datetime import UTC, datetime, timedelta

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.core.names import DOCUMENTS_PARTITIONS
from lumikb_pipeline.db.document_sync import (
    SyncCursor,
    changed_documents,
    changed_since_extraction,
    deleted_document_slugs,
    live_documents,
    needing_processing,
)
from lumikb_pipeline.domain.batching import contiguous_batches
from lumikb_pipeline.infra.dagster_instance import add_missing_partitions
from lumikb_pipeline.jobs import document_processing_job
from lumikb_pipeline.resources import DatabaseResource, GraphStoreResource

PAGE_SIZE = 2000
TICK_BUDGET_S = 20.0
# Read when the code location loads, like the sensor's interval.
RECONCILE_EVERY = timedelta(seconds=get_settings().partitions_reconcile_s)
BATCH_SIZE = get_settings().reextract_batch_size


@sensor(
    job=document_processing_job,
    minimum_interval_seconds=get_settings().partitions_sensor_interval_s,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Every few seconds, keeps the `documents` partitions in step with the app database and runs "
        "document_processing_job for new and changed documents."
    ),
)
def document_partitions_sensor(
    context: SensorEvaluationContext, database: DatabaseResource, graph_store: GraphStoreResource
) -> SensorResult | SkipReason:
    instance = context.instance
    cursor = SyncCursor.parse(context.cursor)
    started = time.monotonic()
    added: list[str] = []
    to_process: list[str] = []
    deleted: dict[str, str | None] = {}

    more = True
    while more and time.monotonic() - started < TICK_BUDGET_S:
        with database.session() as session:
            page = changed_documents(session, cursor, PAGE_SIZE)
            live = [c.doc_id for c in page.changes if not c.deleted]
            to_process.extend(needing_processing(session, live))
        added.extend(add_missing_partitions(instance, live))
        gone = [c for c in page.changes if c.deleted]
        if gone:
            existing = instance.get_existing_dynamic_partitions(DOCUMENTS_PARTITIONS, [c.doc_id for c in gone])
            deleted.update({c.doc_id: c.kb_slug for c in gone if c.doc_id in existing})
        cursor, more = page.cursor, page.more

    now = datetime.now(UTC)
    partition_order: list[str] | None = None
    if not more and now - cursor.reconciled_at >= RECONCILE_EVERY:
        partition_order = list(instance.get_dynamic_partitions(DOCUMENTS_PARTITIONS))
        with database.session() as session:
            live_ids = [doc_id for doc_id, _slug in live_documents(session)]
            known = set(partition_order)
            missing = [doc_id for doc_id in live_ids if doc_id not in known]
            stale = known - set(live_ids)
            deleted.update(deleted_document_slugs(session, stale) if stale else {})
            to_process.extend(needing_processing(session, missing))
            to_process.extend(changed_since_extraction(session))
        added.extend(add_missing_partitions(instance, missing))
        partition_order.extend(missing)
        cursor.reconciled_at = now

    if deleted:
        with graph_store.open() as store:
            for doc_id, kb_slug in deleted.items():
                if kb_slug is None:
                    context.log.warning(f"document {doc_id} is gone from the database; removing its partition only")
                else:
                    store.remove_document(kb_slug, doc_id)
                instance.delete_dynamic_partition(DOCUMENTS_PARTITIONS, doc_id)

    to_process = list(dict.fromkeys(d for d in to_process if d not in deleted))
    run_requests: list[RunRequest] = []
    if to_process:
        if partition_order is None or deleted:
            partition_order = list(instance.get_dynamic_partitions(DOCUMENTS_PARTITIONS))
        for batch in contiguous_batches(partition_order, set(to_process), BATCH_SIZE):
            run_requests.append(
                RunRequest(
                    tags={ASSET_PARTITION_RANGE_START_TAG: batch.first, ASSET_PARTITION_RANGE_END_TAG: batch.last}
                )
            )
    summary = (
        f"{len(added)} partition(s) added, {len(deleted)} deleted, {len(to_process)} document(s) to process "
        f"in {len(run_requests)} run(s)"
    )
    context.log.info(summary)
    if not run_requests and not added and not deleted:
        return SensorResult(skip_reason=SkipReason("no new, changed or deleted documents"), cursor=cursor.serialize())
    return SensorResult(run_requests=run_requests, cursor=cursor.serialize())
