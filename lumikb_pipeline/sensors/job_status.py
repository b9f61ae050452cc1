"""`job_status_sensor`: fires every few seconds; records a `Job` (trigger `ui-backfill`, one per KB)
for each backfill of `document_entities` launched in the Dagster UI, brings each pending or running
job's status, run ids and times in line with its Dagster backfill, and finishes launching a job
whose launch was interrupted, and closes the ledger rows of workers that died (`reap_abandoned_work`:
rows whose Dagster run group has ended, or whose lease expired, are marked failed and their jobs
closed when that finishes them). Launches nothing else."""


from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor
from sqlalchemy import select

from lumikb_pipeline.db.models import Job, JobStatus
from lumikb_pipeline.orchestration.jobs import reap_abandoned_work, record_ui_backfills, refresh_job_status
from lumikb_pipeline.orchestration.settings import get_orchestration_settings
from lumikb_pipeline.resources import DatabaseResource


@sensor(
    minimum_interval_seconds=get_orchestration_settings().job_status_sensor_interval_s,
    default_status=DefaultSensorStatus.RUNNING,
    description=__doc__,
)
def job_status_sensor(context: SensorEvaluationContext, database: DatabaseResource) -> SensorResult:
    settings = database.app_settings()
    recorded = record_ui_backfills(settings, context.instance)
    changes = [f"backfill {backfill_id}: recorded its job(s)" for backfill_id in recorded]
    changes += reap_abandoned_work(settings, context.instance)
    for change in changes:
        context.log.info(change)
    with database.session() as session:
        active = list(session.scalars(select(Job.id).where(Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING]))))
    for job_id in active:
        before = None
        with database.session() as session:
            row = session.get(Job, job_id)
            before = row.status if row is not None else None
        job = refresh_job_status(settings, job_id, context.instance)
        if job.status != before:
            changes.append(f"job {job_id}: {before} -> {job.status}")
            context.log.info(changes[-1])
    message = "; ".join(changes) if changes else f"{len(active)} active job(s), no change"
    return SensorResult(skip_reason=SkipReason(message))
