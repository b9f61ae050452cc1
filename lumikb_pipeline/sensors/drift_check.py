"""`drift_check_sensor`: the drift-check schedule. It fires every ~30 s, reads the cron and the
on/off switch from `app_settings` (set with `lumikb schedule`), and when a cron time has passed
since the last one it handled, launches `drift_check_job` (on `reprocessing`) with that time as the
run key, so every tick is visible and none runs twice. A changed cron applies from the next tick,
without a redeploy or a restart."""


from datetime import UTC, datetime

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from lumikb_pipeline.jobs import drift_check_job
from lumikb_pipeline.orchestration.names import TAG_TRIGGER
from lumikb_pipeline.orchestration.settings import get_orchestration_settings
from lumikb_pipeline.resources import DatabaseResource
from lumikb_pipeline.schedules.drift_schedule import due_tick, read_drift_schedule

TICK_TAG = "lumikb/drift_tick"


@sensor(
    job=drift_check_job,
    minimum_interval_seconds=get_orchestration_settings().drift_sensor_interval_s,
    default_status=DefaultSensorStatus.RUNNING,
    description="Runs drift_check_job at the cron stored in the app database (`lumikb schedule`).",
)
def drift_check_sensor(context: SensorEvaluationContext, database: DatabaseResource) -> SensorResult:
    now = datetime.now(UTC)
    with database.session() as session:
        schedule = read_drift_schedule(session)
    if not context.cursor:
        # First tick ever: start counting from now (no check for times before the sensor existed).
        return SensorResult(
            skip_reason=SkipReason(f"drift check scheduled at '{schedule.cron}' (UTC), next {schedule.next_tick(now)}"),
            cursor=now.isoformat(),
        )
    last = datetime.fromisoformat(context.cursor)
    if not schedule.enabled:
        # Disabled: move the cursor along so enabling later does not fire for the time it was off.
        return SensorResult(skip_reason=SkipReason("drift check disabled (`lumikb schedule enable`)"),
                            cursor=now.isoformat())
    tick = due_tick(schedule.cron, last, now)
    if tick is None:
        return SensorResult(
            skip_reason=SkipReason(f"next drift check at {schedule.next_tick(now).isoformat()} ('{schedule.cron}')"),
            cursor=last.isoformat(),
        )
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"drift:{tick.isoformat()}", tags={TICK_TAG: tick.isoformat(), TAG_TRIGGER: "schedule"})
        ],
        cursor=tick.isoformat(),
    )
