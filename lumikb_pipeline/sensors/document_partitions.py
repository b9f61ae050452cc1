"""`document_partitions_sensor`: fires every few seconds; adds a `documents` partition for each new
document (keyed by its readable `partition_key`), removes the graph contribution and the partition
of each deleted one (and the partitions still keyed by document id from before readable keys), and
launches `document_processing_job` runs (batches of consecutive partitions, `document_processing`
queue) for new and changed documents."""


import time
from datetime import UTC, datetime, timedelta

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.core.names import DOCUMENTS_PARTITIONS
from lumikb_pipeline.db.document_sync import (
    StalePartition,
    SyncCursor,
    changed_documents,
    changed_since_extraction,
    live_documents,
    needing_processing,
    stale_partitions,
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
    # Documents by id, their partitions by key (`Document.partition_key`).
    key_of: dict[str, str] = {}
    to_process: list[str] = []
    deleted: dict[str, StalePartition] = {}

    more = True
    while more and time.monotonic() - started < TICK_BUDGET_S:
        with database.session() as session:
            page = changed_documents(session, cursor, PAGE_SIZE)
            live = [c.doc_id for c in page.changes if not c.deleted]
            key_of.update({c.doc_id: c.partition_key for c in page.changes})
            to_process.extend(needing_processing(session, live))
        added.extend(add_missing_partitions(instance, [key_of[doc_id] for doc_id in live]))
        gone = [c for c in page.changes if c.deleted]
        if gone:
            existing = instance.get_existing_dynamic_partitions(DOCUMENTS_PARTITIONS, [c.partition_key for c in gone])
            deleted.update(
                {c.partition_key: StalePartition(c.doc_id, c.kb_slug) for c in gone if c.partition_key in existing}
            )
        cursor, more = page.cursor, page.more

    now = datetime.now(UTC)
    partition_order: list[str] | None = None
    if not more and now - cursor.reconciled_at >= RECONCILE_EVERY:
        partition_order = list(instance.get_dynamic_partitions(DOCUMENTS_PARTITIONS))
        with database.session() as session:
            live_docs = live_documents(session)
            key_of.update(live_docs)
            live_keys = {key for _doc_id, key in live_docs}
            known = set(partition_order)
            missing = [doc_id for doc_id, key in live_docs if key not in known]
            # Partitions of deleted documents, and those keyed by document id (before readable keys).
            stale = known - live_keys
            deleted.update(stale_partitions(session, stale))
            to_process.extend(needing_processing(session, missing))
            to_process.extend(changed_since_extraction(session))
        missing_keys = [key_of[doc_id] for doc_id in missing]
        added.extend(add_missing_partitions(instance, missing_keys))
        partition_order.extend(missing_keys)
        cursor.reconciled_at = now

    if deleted:
        with graph_store.open() as store:
            for key, gone_doc in deleted.items():
                if gone_doc.doc_id is None:
                    context.log.warning(f"partition {key}: no such document in the database; removing the partition")
                elif gone_doc.kb_slug is None:
                    context.log.info(f"partition {key}: document {gone_doc.doc_id} is now partition "
                                     f"{key_of.get(gone_doc.doc_id, '?')}; removing the old partition only")
                else:
                    store.remove_document(gone_doc.kb_slug, gone_doc.doc_id)
                instance.delete_dynamic_partition(DOCUMENTS_PARTITIONS, key)

    deleted_ids = {gone_doc.doc_id for gone_doc in deleted.values() if gone_doc.kb_slug is not None}
    to_process = list(dict.fromkeys(key_of[d] for d in to_process if d not in deleted_ids and d in key_of))
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
