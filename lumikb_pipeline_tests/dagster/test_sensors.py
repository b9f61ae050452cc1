"""The partitions sensor and the schema-version sensor, evaluated against a real database (and
Neo4j for deletions) with an in-memory Dagster instance."""

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context
from sqlalchemy import select

from lumikb_pipeline.core.config import Settings, load_settings
from lumikb_pipeline.db import catalog, ledger
from lumikb_pipeline.db.models import Document, Job
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.definitions import defs
from lumikb_pipeline.domain.schema import parse_schema_file
from lumikb_pipeline.reextraction.service import Selection, start_reextraction
from lumikb_pipeline.reextraction.status import refresh_job_status
from lumikb_pipeline.resources import DatabaseResource, GraphStoreResource, ReextractionResource
from lumikb_pipeline_tests.dagster.helpers import (
    SCHEMA_V1,
    SCHEMA_V2,
    document_text,
    partition_keys,
    ui_partition_filter,
    unique_slug,
)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as instance:
        yield instance


def _kb_with_documents(url: str, folder: Path, count: int) -> tuple[str, list[Path], list[str]]:
    slug = unique_slug("sensor")
    with session_scope(url) as session:
        catalog.create_kb(session, slug, parse_schema_file(SCHEMA_V1))
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"d{i}.txt"
        path.write_text(document_text("s", i))
        paths.append(path)
    report = catalog.ingest(url, slug, paths)
    return slug, paths, list(report.document_ids)


def _settings(url: str) -> Settings:
    """The environment's settings on the app database at `url`."""
    return load_settings().model_copy(update={"database_url": url})


def _tick(
    sensor: Any, instance: DagsterInstance, url: str, cursor: str | None = None, **resources: Any
) -> SensorResult:
    """One evaluation of `sensor` against the app database at `url` (plus any other resources)."""
    context = build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs,
        resources={
            "database": DatabaseResource(database_url=url), "reextraction": ReextractionResource(database_url=url),
            **resources,
        },
    )
    result = sensor(context)
    assert isinstance(result, SensorResult)
    return result


def _partitions_tick(instance: DagsterInstance, url: str, cursor: str | None) -> SensorResult:
    from lumikb_pipeline.sensors.document_partitions import document_partitions_sensor

    return _tick(document_partitions_sensor, instance, url, cursor, graph_store=GraphStoreResource())


def test_partitions_follow_new_changed_and_deleted_documents(
    pg_url: str, tmp_path: Path, instance: DagsterInstance
) -> None:
    slug, paths, ids = _kb_with_documents(pg_url, tmp_path / "docs", 3)
    keys = partition_keys(ids, pg_url)
    assert all(key.startswith(f"{slug}/") for key in keys)

    first = _partitions_tick(instance, pg_url, None)
    assert list(instance.get_dynamic_partitions("documents")) == keys
    assert [(r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
            for r in first.run_requests or []] == [(keys[0], keys[2])]

    second = _partitions_tick(instance, pg_url, first.cursor)
    assert not second.run_requests

    paths[1].write_text(document_text("s", 1, "Now with more words."))
    catalog.ingest(pg_url, slug, [paths[1]])
    with session_scope(pg_url) as session:
        catalog.delete_document(session, ids[2])
    third = _partitions_tick(instance, pg_url, second.cursor)
    assert list(instance.get_dynamic_partitions("documents")) == keys[:2]
    assert [(r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
            for r in third.run_requests or []] == [(keys[1], keys[1])]


def test_a_partition_key_is_readable_and_stays_when_the_title_changes(
    pg_url: str, tmp_path: Path, instance: DagsterInstance
) -> None:
    slug = unique_slug("keys")
    with session_scope(pg_url) as session:
        catalog.create_kb(session, slug, parse_schema_file(SCHEMA_V1))
    path = tmp_path / "msa.md"
    path.write_text("# Master Services Agreement\n\n" + document_text("k", 0))
    [doc_id] = catalog.ingest(pg_url, slug, [path]).document_ids
    [key] = partition_keys([doc_id], pg_url)
    assert key == f"{slug}/master-services-agreement-{doc_id.replace('-', '')[:8]}"
    _partitions_tick(instance, pg_url, None)
    assert list(instance.get_dynamic_partitions("documents")) == [key]

    path.write_text("# Amended and Restated Agreement\n\n" + document_text("k", 0, "Changed."))
    report = catalog.ingest(pg_url, slug, [path])
    assert report.changed and report.partition_keys == [key]
    with session_scope(pg_url) as session:
        document = session.get_one(Document, doc_id)
        assert document.title == "Amended and Restated Agreement" and document.partition_key == key


def test_filtering_the_partitions_by_a_kb_slug_or_a_word_of_a_title_selects_the_right_documents(
    pg_url: str, tmp_path: Path, instance: DagsterInstance
) -> None:
    titles = {"contracts": ["Master Services Agreement", "Mutual NDA with Acme", "Supply agreement: Müller GmbH"],
              "hr": ["Leave policy", "Onboarding agreement template"]}
    kb_slugs, by_title = {}, {}
    for name, kb_titles in titles.items():
        slug = kb_slugs[name] = unique_slug(name)
        with session_scope(pg_url) as session:
            catalog.create_kb(session, slug, parse_schema_file(SCHEMA_V1))
        folder = tmp_path / name
        folder.mkdir()
        for i, title in enumerate(kb_titles):
            (folder / f"{i}.md").write_text(f"# {title}\n\n" + document_text(name, i))
        report = catalog.ingest(pg_url, slug, [folder])
        by_title.update(zip(kb_titles, partition_keys(report.document_ids, pg_url), strict=True))
    _partitions_tick(instance, pg_url, None)
    keys = list(instance.get_dynamic_partitions("documents"))
    assert set(by_title.values()) <= set(keys)

    assert set(ui_partition_filter(keys, kb_slugs["hr"])) == {by_title["Leave policy"],
                                                              by_title["Onboarding agreement template"]}
    assert set(ui_partition_filter(keys, " Agreement ")) == {
        by_title["Master Services Agreement"], by_title["Supply agreement: Müller GmbH"],
        by_title["Onboarding agreement template"]}
    assert ui_partition_filter(keys, "muller") == [by_title["Supply agreement: Müller GmbH"]]
    assert ui_partition_filter(keys, "nda") == [by_title["Mutual NDA with Acme"]]


def test_partitions_keyed_by_document_id_are_replaced_by_readable_keys_and_the_graph_is_kept(
    pg_url: str, tmp_path: Path, instance: DagsterInstance
) -> None:
    """An instance from before readable keys has one partition per document id; the sensor's first
    full comparison replaces them with the documents' keys and runs nothing for documents already
    extracted (a deleted document's old partition takes its graph contribution with it)."""
    slug, _paths, ids = _kb_with_documents(pg_url, tmp_path / "docs", 3)
    keys = partition_keys(ids, pg_url)
    with session_scope(pg_url) as session:
        kb = catalog.get_kb(session, slug)
        ledger.ensure_records(session, kb.id, ids, 1)
        for doc_id in ids:
            assert ledger.claim(session, doc_id, 1, "test-seed")
            ledger.mark_succeeded(session, doc_id, 1, "test-seed", ledger.Outcome())
        catalog.delete_document(session, ids[2])
    instance.add_dynamic_partitions("documents", [*ids, "not-a-document"])

    result = _partitions_tick(instance, pg_url, None)
    assert list(instance.get_dynamic_partitions("documents")) == keys[:2]
    assert not result.run_requests


def _schema_tick(instance: DagsterInstance, url: str, cursor: str | None) -> SensorResult:
    from lumikb_pipeline.sensors.schema_version import schema_version_sensor

    return _tick(schema_version_sensor, instance, url, cursor)


def test_a_schema_change_starts_exactly_one_job_across_ticks_and_lost_cursors(
    pg_url: str, tmp_path: Path, instance: DagsterInstance
) -> None:
    slug, _paths, ids = _kb_with_documents(pg_url, tmp_path / "docs", 4)
    quiet = _schema_tick(instance, pg_url, None)
    assert not instance.get_backfills()
    with session_scope(pg_url) as session:
        catalog.set_schema(session, slug, parse_schema_file(SCHEMA_V2))

    started = _schema_tick(instance, pg_url, quiet.cursor)
    [backfill] = instance.get_backfills()
    with session_scope(pg_url) as session:
        [job] = session.scalars(select(Job)).all()
        assert (job.dedupe_key, job.trigger.value, job.total_documents) == (f"sensor:{slug}:2", "sensor", 4)
        assert job.dagster_backfill_id == backfill.backfill_id
    assert backfill.tags["lumikb/job_id"] == job.id and backfill.tags["lumikb/schema_version"] == "2"
    assert backfill.tags["lumikb/queue"] == "reprocessing"
    assert set(instance.get_dynamic_partitions("documents")) == set(partition_keys(ids, pg_url))

    _schema_tick(instance, pg_url, started.cursor)  # a later tick
    _schema_tick(instance, pg_url, None)  # a restart that lost the cursor
    assert len(instance.get_backfills()) == 1
    with session_scope(pg_url) as session:
        assert len(session.scalars(select(Job)).all()) == 1


def test_a_schema_change_with_no_outdated_document_starts_no_job(pg_url: str, instance: DagsterInstance) -> None:
    slug = unique_slug("empty")
    with session_scope(pg_url) as session:
        catalog.create_kb(session, slug, parse_schema_file(SCHEMA_V1))
    quiet = _schema_tick(instance, pg_url, None)
    with session_scope(pg_url) as session:
        catalog.set_schema(session, slug, parse_schema_file(SCHEMA_V2))
        jobs_before = len(session.scalars(select(Job)).all())
    tick = _schema_tick(instance, pg_url, quiet.cursor)
    assert not instance.get_backfills()
    with session_scope(pg_url) as session:
        assert len(session.scalars(select(Job)).all()) == jobs_before
    assert _schema_tick(instance, pg_url, tick.cursor).skip_reason is not None


def _ended_job(url: str, slug: str) -> str:
    from lumikb_pipeline.db.models import JobStatus, JobTrigger, KnowledgeBase, utcnow

    with session_scope(url) as session:
        kb = session.scalars(select(KnowledgeBase).where(KnowledgeBase.slug == slug)).one()
        job = Job(kb_id=kb.id, target_schema_version=1, selection={"kind": "all"}, trigger=JobTrigger.CLI,
                  status=JobStatus.SUCCEEDED, finished_at=utcnow())
        session.add(job)
        session.flush()
        return job.id


def test_the_graph_checks_run_once_after_re_extraction_jobs_end(pg_url: str, instance: DagsterInstance) -> None:
    from lumikb_pipeline.sensors.graph_checks import graph_checks_sensor

    slug = unique_slug("checks")
    with session_scope(pg_url) as session:
        catalog.create_kb(session, slug, parse_schema_file(SCHEMA_V1))
    _ended_job(pg_url, slug)  # ended before the sensor existed: not checked
    first = _tick(graph_checks_sensor, instance, pg_url)
    assert not first.run_requests
    assert not _tick(graph_checks_sensor, instance, pg_url, first.cursor).run_requests
    _ended_job(pg_url, slug)
    last = _ended_job(pg_url, slug)
    after = _tick(graph_checks_sensor, instance, pg_url, first.cursor)
    [request] = after.run_requests or []
    assert request.run_key == f"invariants-after:{last}" and request.tags["lumikb/job_id"] == last
    assert not _tick(graph_checks_sensor, instance, pg_url, after.cursor).run_requests


def test_the_graph_checks_sensor_reads_a_cursor_without_a_time_zone(instance: DagsterInstance, pg_url: str) -> None:
    # On a database where no job has ended yet, the first tick's cursor is the earliest time; stored
    # without a zone, every later tick failed with "naive datetime given to the database".
    from lumikb_pipeline.sensors.graph_checks import graph_checks_sensor

    slug = unique_slug("checks")
    with session_scope(pg_url) as session:
        catalog.create_kb(session, slug, parse_schema_file(SCHEMA_V1))
    _ended_job(pg_url, slug)
    result = _tick(graph_checks_sensor, instance, pg_url, "0001-01-01T00:00:00")
    assert result.run_requests and result.cursor is not None
    assert datetime.fromisoformat(result.cursor).tzinfo is not None


def _store_sensor_status(instance: DagsterInstance, status: str) -> None:
    """Store the schema sensor's status as the webserver does when it is stopped or started."""
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteInstigatorOrigin, RemoteRepositoryOrigin
    from dagster._core.scheduler.instigation import InstigatorState, InstigatorStatus, InstigatorType

    location = GrpcServerCodeLocationOrigin(host="127.0.0.1", port=4266, location_name="lumikb_pipeline")
    origin = RemoteInstigatorOrigin(RemoteRepositoryOrigin(location, "__repository__"), "schema_version_sensor")
    state = InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus(status))
    stored = [s for s in instance.all_instigator_state() if s.name == "schema_version_sensor"]
    (instance.update_instigator_state if stored else instance.add_instigator_state)(state)


def test_a_tick_in_flight_when_the_sensor_is_stopped_starts_nothing_and_the_restarted_sensor_catches_up(
    pg_url: str, tmp_path: Path
) -> None:
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:  # one that stores sensor states
        _stopped_sensor_case(pg_url, tmp_path, instance)


def _stopped_sensor_case(pg_url: str, tmp_path: Path, instance: DagsterInstance) -> None:
    # An admin stops the sensor and then changes a schema, while a tick that began before the stop
    # is still running: the daemon does not re-check the status of a tick in flight.
    slug, _paths, _ids = _kb_with_documents(pg_url, tmp_path / "docs", 2)
    quiet = _schema_tick(instance, pg_url, None)
    _store_sensor_status(instance, "STOPPED")
    with session_scope(pg_url) as session:
        catalog.set_schema(session, slug, parse_schema_file(SCHEMA_V2))

    in_flight = _schema_tick(instance, pg_url, quiet.cursor)
    assert not instance.get_backfills()
    with session_scope(pg_url) as session:
        assert not session.scalars(select(Job)).all()
    assert in_flight.cursor == quiet.cursor  # the version is not marked handled
    assert "stopped" in str(in_flight.skip_reason)

    _store_sensor_status(instance, "RUNNING")  # started again: the change is picked up
    _schema_tick(instance, pg_url, in_flight.cursor)
    assert len(instance.get_backfills()) == 1
    with session_scope(pg_url) as session:
        [job] = session.scalars(select(Job)).all()
        assert job.dedupe_key == f"sensor:{slug}:2"


def _ui_backfill(instance: DagsterInstance, backfill_id: str, doc_ids: list[str], url: str | None = None) -> None:
    """A backfill of `document_entities` as the Dagster UI launches it: over the documents' partition
    keys, with no lumikb tags."""
    import time

    from dagster._core.execution.backfill import PartitionBackfill

    from lumikb_pipeline.assets.document_entities import DOCUMENT_ENTITIES

    instance.add_backfill(PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id, asset_graph=defs.resolve_asset_graph(), partition_names=partition_keys(doc_ids, url),
        asset_selection=[DOCUMENT_ENTITIES], backfill_timestamp=time.time(), tags={},
        dynamic_partitions_store=instance, all_partitions=False, title=None, description=None, run_config=None,
    ))


def _job_status_tick(instance: DagsterInstance, url: str) -> SensorResult:
    from lumikb_pipeline.sensors.job_status import job_status_sensor

    return _tick(job_status_sensor, instance, url)


def test_a_backfill_launched_in_the_ui_gets_one_job_per_kb_found_by_its_backfill_id(
    pg_url: str, tmp_path: Path, instance: DagsterInstance
) -> None:
    from lumikb_pipeline.core.errors import UsageError
    from lumikb_pipeline.db import ledger
    from lumikb_pipeline.infra import redis_client
    from lumikb_pipeline.reextraction.backfills import ui_backfill_jobs
    from lumikb_pipeline.tracking.progress import job_progress

    settings = _settings(pg_url)
    one, _, one_ids = _kb_with_documents(pg_url, tmp_path / "one", 3)
    two, _, two_ids = _kb_with_documents(pg_url, tmp_path / "two", 2)
    instance.add_dynamic_partitions("documents", partition_keys(one_ids + two_ids, pg_url))
    _ui_backfill(instance, "uibackfillboth", one_ids[:2] + two_ids, pg_url)
    _ui_backfill(instance, "uibackfillone", one_ids[2:], pg_url)

    first = _job_status_tick(instance, pg_url)
    assert "backfill uibackfillboth: recorded" in str(first.skip_reason)
    _job_status_tick(instance, pg_url)  # a later tick records nothing twice
    with session_scope(pg_url) as session:
        jobs = {(job.dagster_backfill_id, job.kb_id): job for job in session.scalars(select(Job))}
        assert len(jobs) == 3
        assert {job.trigger.value for job in jobs.values()} == {"ui-backfill"}
        assert {job.status.value for job in jobs.values()} == {"running"}
        assert sorted(job.total_documents for job in jobs.values()) == [1, 2, 2]
        both = sorted(job.id for (backfill_id, _), job in jobs.items() if backfill_id == "uibackfillboth")
        [only] = [job.id for (backfill_id, _), job in jobs.items() if backfill_id == "uibackfillone"]
        # The ledger rows belong to the jobs, so runs and progress count them.
        assert {row.job_id for row in ledger.records_for(session, one_ids[2:], 1).values()} == {only}
        # `lumikb progress` and `lumikb cancel` take the backfill id the UI shows.
        assert ledger.find_job(session, "uibackfillone").id == only
        with pytest.raises(UsageError, match="one per KB: " + ", ".join(both)):
            ledger.find_job(session, "uibackfillboth")
        progress = job_progress(session, redis_client.connect(settings), "uibackfillone")
        assert (progress.job_id, progress.total, progress.remaining) == (only, 1, 1)

    # A run of the backfill maps each of its documents to its KB's job (as the ops do).
    mapping = ui_backfill_jobs(settings, instance, "uibackfillboth", one_ids[:2] + two_ids)
    assert set(mapping) == set(one_ids[:2] + two_ids) and set(mapping.values()) == set(both)
    assert mapping[one_ids[0]] == mapping[one_ids[1]] != mapping[two_ids[0]] == mapping[two_ids[1]]


def test_a_job_the_workers_close_during_a_status_refresh_stays_closed(
    pg_url: str, tmp_path: Path, instance: DagsterInstance
) -> None:
    from lumikb_pipeline.db.models import JobStatus, utcnow

    settings = _settings(pg_url)
    slug, _, _ = _kb_with_documents(pg_url, tmp_path / "docs", 2)
    job = start_reextraction(settings, slug, Selection.all(), instance=instance, asset_graph=defs.resolve_asset_graph())
    assert job.status == JobStatus.RUNNING and instance.get_backfills()[0].status.value == "REQUESTED"

    class WorkersFinishMeanwhile:
        """The instance, except that the job's last document ends while the backfill is being read
        (the backfill stays REQUESTED until Dagster's next iteration)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(instance, name)

        def get_backfill(self, backfill_id: str) -> Any:
            with session_scope(pg_url) as session:
                row = session.get_one(Job, job.id)
                row.status, row.finished_at = JobStatus.SUCCEEDED, utcnow()
            return instance.get_backfill(backfill_id)

    refreshed = refresh_job_status(settings, job.id, WorkersFinishMeanwhile())  # type: ignore[arg-type]
    with session_scope(pg_url) as session:
        assert session.get_one(Job, job.id).status == JobStatus.SUCCEEDED
    assert refreshed.status == JobStatus.SUCCEEDED


def _launchable_kb(pg_url: str, tmp_path: Path) -> tuple[Settings, str, list[str], Any]:
    """Settings on the app database at `pg_url`, a KB of 3 documents (slug, document ids) and the code
    location's asset graph: what a launch of a re-extraction job needs."""
    slug, _, ids = _kb_with_documents(pg_url, tmp_path / "docs", 3)
    return _settings(pg_url), slug, ids, defs.resolve_asset_graph()


def test_a_status_refresh_while_the_cli_launches_a_job_leaves_the_launch_to_it(
    pg_url: str, tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lumikb_pipeline.db.models import JobStatus

    settings, slug, _ids, asset_graph = _launchable_kb(pg_url, tmp_path)
    ticked: list[str] = []
    refreshed: list[Job] = []
    add_backfill = instance.add_backfill

    def sensor_ticks_first(backfill: Any) -> None:
        """The job-status sensor refreshes the job (pending, with no backfill yet) just before the CLI
        adds the job's backfill."""
        if not ticked:
            ticked.append(backfill.backfill_id)
            refreshed.append(refresh_job_status(settings, backfill.tags["lumikb/job_id"], instance, asset_graph))
        add_backfill(backfill)

    monkeypatch.setattr(instance, "add_backfill", sensor_ticks_first)
    job = start_reextraction(settings, slug, Selection.all(), instance=instance, asset_graph=asset_graph)
    [during] = refreshed
    assert during.status == JobStatus.PENDING
    [backfill] = instance.get_backfills()
    assert backfill.backfill_id == job.dagster_backfill_id and job.status == JobStatus.RUNNING
    after = refresh_job_status(settings, job.id, instance, asset_graph)
    assert after.status == JobStatus.RUNNING and len(instance.get_backfills()) == 1


def test_a_launch_interrupted_before_its_backfill_is_finished_by_the_next_status_refresh(
    pg_url: str, tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lumikb_pipeline.db.models import JobStatus, KnowledgeBase

    settings, slug, ids, asset_graph = _launchable_kb(pg_url, tmp_path)

    def dies(_backfill: Any) -> None:
        raise ConnectionError("the Dagster database went away mid-launch")

    monkeypatch.setattr(instance, "add_backfill", dies)
    with pytest.raises(ConnectionError):
        start_reextraction(settings, slug, Selection.all(), instance=instance, asset_graph=asset_graph)
    monkeypatch.undo()
    with session_scope(pg_url) as session:
        kb_id = session.scalars(select(KnowledgeBase.id).where(KnowledgeBase.slug == slug)).one()
        [job] = session.scalars(select(Job).where(Job.kb_id == kb_id)).all()
        assert job.status == JobStatus.PENDING and job.dagster_backfill_id is None
    assert not instance.get_backfills()

    refreshed = refresh_job_status(settings, job.id, instance, asset_graph)
    [backfill] = instance.get_backfills()
    assert refreshed.status == JobStatus.RUNNING and refreshed.dagster_backfill_id == backfill.backfill_id
    target = backfill.asset_backfill_data.target_subset  # type: ignore[union-attr]
    assert {key.partition_key for key in target.iterate_asset_partitions()} == set(partition_keys(ids, pg_url))
