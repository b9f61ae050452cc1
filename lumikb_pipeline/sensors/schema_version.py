"""`schema_version_sensor`: fires when a KB's schema version goes up; starts one re-extraction job
of exactly that KB's outdated documents (none when no document is outdated, e.g. the demo already
re-extracted them) (a backfill of `document_entities` on the `reprocessing`
queue, batched), recorded as a `Job` with trigger `sensor`. Its dedupe key `sensor:<kb>:<version>`
is unique, so no KB and version ever gets two jobs, across ticks and restarts.

A stop (UI or API) is honoured by a tick already in flight: the daemon does not look at a sensor's
status again once it has handed the tick to a thread, and this sensor starts its jobs itself (not
through run requests, which the daemon would check). So after reading the KBs, and before each job,
it reads its own status, and once stopped it starts nothing and keeps its cursor. Reading the KBs
first makes this exact for an admin who stops the sensor and then changes a schema: a tick that
sees the new version reads the status after the stop was stored. When the sensor is started again,
its first tick starts the jobs of the versions it has not handled. Dagster's daemon itself can undo a
stop that lands during a tick (it writes back the state it read at the tick's start): docs/dagster.md.
"""


import json

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor
from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType
from sqlalchemy import select

from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.db.catalog import get_kb
from lumikb_pipeline.db.models import JobTrigger, KnowledgeBase
from lumikb_pipeline.reextraction.service import Selection, select_documents
from lumikb_pipeline.resources import DatabaseResource, ReextractionResource

SENSOR_NAME = "schema_version_sensor"


def dedupe_key(kb_slug: str, version: int) -> str:
    """The one job a schema version of a KB may have from this sensor."""
    return f"sensor:{kb_slug}:{version}"


def stopped(context: SensorEvaluationContext) -> bool:
    """Whether this sensor's stored status is STOPPED now (a stop while this tick was in flight)."""
    if context.instance.schedule_storage is None:  # an ephemeral instance (tests) stores no status
        return False
    location = context.code_location_origin.location_name if context.code_location_origin else None
    for state in context.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        repository = state.origin.repository_origin
        if state.name != SENSOR_NAME:
            continue
        if context.repository_name and repository.repository_name != context.repository_name:
            continue
        if location and repository.code_location_origin.location_name != location:
            continue
        return state.status == InstigatorStatus.STOPPED
    return False  # no stored state: the sensor runs by default


@sensor(
    name=SENSOR_NAME,
    minimum_interval_seconds=get_settings().schema_sensor_interval_s,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "When a KB's schema version goes up, starts one re-extraction job (a backfill on the reprocessing queue) "
        "of that KB's outdated documents."
    ),
)
def schema_version_sensor(
    context: SensorEvaluationContext, database: DatabaseResource, reextraction: ReextractionResource
) -> SensorResult:
    # Cursor: the schema version last handled per KB id. A KB never seen counts as at version 1
    # (its first version needs no re-extraction: normal processing extracts new documents).
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    with database.session() as session:
        kbs = session.execute(select(KnowledgeBase.id, KnowledgeBase.slug, KnowledgeBase.current_schema_version)).all()
    started: list[str] = []
    for kb_id, slug, version in kbs:
        if version <= seen.get(str(kb_id), 1):
            continue
        if stopped(context):  # checked after reading the KBs: see the module docstring
            context.log.info(f"stopped while this tick ran; not starting KB {slug} v{version} (nor any later)")
            return SensorResult(
                skip_reason=SkipReason("the sensor was stopped during this tick; started " + (
                    "; ".join(started) if started else "nothing")),
                cursor=json.dumps(seen, sort_keys=True),
            )
        with database.session() as session:
            outdated = len(select_documents(session, get_kb(session, slug), Selection.outdated()))
        if not outdated:  # no job for zero documents
            context.log.info(f"KB {slug} is at schema version {version}: no document is outdated, no job")
            seen[str(kb_id)] = version
            continue
        job = reextraction.start(
            slug, Selection.outdated(), instance=context.instance,
            asset_graph=context.repository_def.asset_graph if context.repository_def else None,
            mode="replace", trigger=JobTrigger.SENSOR, dedupe_key=dedupe_key(slug, version),
        )
        context.log.info(
            f"KB {slug} is at schema version {version}: job {job.id} re-extracts {job.total_documents} outdated "
            f"document(s) (backfill {job.dagster_backfill_id})"
        )
        started.append(f"{slug} v{version}: job {job.id} ({job.total_documents} documents)")
        seen[str(kb_id)] = version
    cursor = json.dumps(seen, sort_keys=True)
    if not started:
        return SensorResult(skip_reason=SkipReason("no KB's schema version went up"), cursor=cursor)
    return SensorResult(skip_reason=SkipReason("started " + "; ".join(started)), cursor=cursor)
