"""`job_status_sensor`: fires every few seconds; records a `Job` (trigger `ui-backfill`, one per KB)
for each backfill of `document_entities` launched in the Dagster UI, brings each pending or running
job's status, run ids and times in line with its Dagster backfill, and finishes launching a job
whose launch was interrupted. It also recovers from dead workers: it fails the started runs whose
process died and frees their pool slots (`infra.run_watchdog.fail_dead_runs`), marks failed the
ledger rows their claimants abandoned and closes the jobs that finishes (`reap_abandoned_work`), and
delivers again the Celery steps whose whole worker died (`infra.lost_steps.requeue_lost_steps`). It
keeps what runs leave behind bounded (`infra.run_retention`): on every tick it deletes the step
outputs of runs that succeeded or ended over a day ago (`DatabaseResource.prune_step_outputs`), and
every ten minutes the compute-log folders of runs finished over a day ago. Launches nothing else."""


from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor
from sqlalchemy import select

from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db.models import Job, JobStatus
from lumikb_pipeline.infra.lost_steps import requeue_lost_steps
from lumikb_pipeline.infra.run_retention import prune_run_storage_now_and_then
from lumikb_pipeline.infra.run_watchdog import fail_dead_runs
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
    changes += fail_dead_runs(context.instance)
    try:
        changes += requeue_lost_steps(get_settings())
    except Exception as exc:  # noqa: BLE001 - the broker away: the jobs' status is still kept below
        context.log.warning(scrub(f"could not look for lost Celery steps: {type(exc).__name__}: {exc}"))
    changes += reextraction.reap_abandoned_work(context.instance)
    changes += database.prune_step_outputs(context.instance)
    changes += prune_run_storage_now_and_then(context.instance)
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
