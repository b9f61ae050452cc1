"""`job_status_sensor`: fires every few seconds; records a `Job` (trigger `ui-backfill`, one per KB)
for each backfill of `document_entities` launched in the Dagster UI, brings each pending or running
job's status, run ids and times in line with its Dagster backfill, and finishes launching a job
whose launch was interrupted, and closes the ledger rows of workers that died (`reap_abandoned_work`:
rows whose Dagster run group has ended, or whose lease expired, are marked failed and their jobs
closed when that finishes them). Launches nothing else."""


from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor
from sqlalchemy import select

from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.db.models import Job, JobStatus
from lumikb_pipeline.resources import DatabaseResource, ReextractionResource


@sensor(
    minimum_interval_seconds=get_settings().job_status_sensor_interval_s,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Every few seconds, records a job for each UI backfill of document_entities and keeps every job's "
        "status in line with its backfill."
    ),
)
def job_status_sensor(
    context: SensorEvaluationContext, database: DatabaseResource, reextraction: ReextractionResource
) -> SensorResult:
    recorded = reextraction.record_ui_backfills(context.instance)
    changes = [f"backfill {backfill_id}: recorded its job(s)" for backfill_id in recorded]
    changes += reextraction.reap_abandoned_work(context.instance)
    for change in changes:
        context.log.info(change)
    with database.session() as session:
        active = list(session.scalars(select(Job.id).where(Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING]))))
    for job_id in active:
        before = None
        with database.session() as session:
            row = session.get(Job, job_id)
            before = row.status if row is not None else None
        asset_graph = context.repository_def.asset_graph if context.repository_def else None
        job = reextraction.refresh(job_id, context.instance, asset_graph)
        if job.status != before:
            changes.append(f"job {job_id}: {before} -> {job.status}")
            context.log.info(changes[-1])
    message = "; ".join(changes) if changes else f"{len(active)} active job(s), no change"
    return SensorResult(skip_reason=SkipReason(message))
