"""`graph_checks_sensor`: after re-extraction jobs end, runs `graph_invariants_job` (the graph
invariant checks of `knowledge_graph`) once, so every job's effect on the graph is checked and the
checks' results are those of the graph as it is now. Its cursor is the end time of the last job it
handled; on its first tick it starts from the jobs ended until then (it does not check old jobs)."""


from datetime import UTC, datetime

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor
from sqlalchemy import func, select

from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.core.names import TAG_JOB_ID, TAG_TRIGGER
from lumikb_pipeline.db.models import Job
from lumikb_pipeline.jobs import graph_invariants_job
from lumikb_pipeline.resources import DatabaseResource


@sensor(
    job=graph_invariants_job,
    minimum_interval_seconds=get_settings().job_status_sensor_interval_s,
    default_status=DefaultSensorStatus.RUNNING,
    description="After re-extraction jobs end, runs the graph invariant checks of knowledge_graph once.",
)
def graph_checks_sensor(context: SensorEvaluationContext, database: DatabaseResource) -> SensorResult:
    with database.session() as session:
        if not context.cursor:
            last = session.scalar(select(func.max(Job.finished_at)))
            return SensorResult(
                skip_reason=SkipReason("first tick: checks follow the jobs that end from now on"),
                cursor=(last or datetime.min.replace(tzinfo=UTC)).isoformat(),
            )
        since = _as_utc(datetime.fromisoformat(context.cursor))
        ended = session.execute(
            select(Job.id, Job.finished_at).where(Job.finished_at > since).order_by(Job.finished_at, Job.id)
        ).tuples().all()
    if not ended:
        return SensorResult(skip_reason=SkipReason("no re-extraction job ended since the last check"))
    last_id, last_end = ended[-1]
    assert last_end is not None
    context.log.info(f"{len(ended)} job(s) ended: {', '.join(job_id for job_id, _ in ended)}; checking the graph")
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"invariants-after:{last_id}", tags={TAG_TRIGGER: "job-end", TAG_JOB_ID: last_id})
        ],
        cursor=last_end.isoformat(),
    )


def _as_utc(moment: datetime) -> datetime:
    """The cursor as an aware time (cursors stored before it carried a zone are UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
