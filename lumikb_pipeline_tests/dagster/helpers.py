"""Helpers of the Dagster tests: KBs, documents, ledger counts and what the event log says."""

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

DEMO = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo"
SCHEMA_V1 = DEMO / "schema_v1.yaml"
SCHEMA_V2 = DEMO / "schema_v2.yaml"
EXTRACT_STEP = "document_entities.extract_document_entities"
WRITE_STEP = "document_entities.write_document_entities"


def unique_slug(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def database_url() -> str:
    from lumikb_pipeline.core.config import get_settings

    return get_settings().effective_database_url


def create_kb(slug: str, schema: Path = SCHEMA_V1) -> None:
    from lumikb_pipeline.db import catalog
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.domain.schema import parse_schema_file

    with session_scope(database_url()) as session:
        catalog.create_kb(session, slug, parse_schema_file(schema))


def set_schema(slug: str, schema: Path) -> int:
    from lumikb_pipeline.db import catalog
    from lumikb_pipeline.db.session import session_scope
    from lumikb_pipeline.domain.schema import parse_schema_file

    with session_scope(database_url()) as session:
        version, _changed = catalog.set_schema(session, slug, parse_schema_file(schema))
    return version


def document_text(tag: str, i: int, marker: str = "") -> str:
    """A small document the heuristic extractor finds two organisations, a person and places in."""
    return (
        f"Firm{tag}x{i} Corporation employs Ann{tag}x{i} Berg. Firm{tag}x{i} Corporation is located in "
        f"Town{i % 13}. {marker}\n"
    )


def write_documents(folder: Path, tag: str, count: int, markers: dict[int, str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{tag}-{i:04d}.txt"
        path.write_text(document_text(tag, i, (markers or {}).get(i, "")))
        paths.append(path)
    return paths


def ingest(slug: str, folder: Path) -> list[str]:
    """Ingest a folder; the document ids in file order."""
    from lumikb_pipeline.db import catalog

    report = catalog.ingest(database_url(), slug, [folder])
    assert not report.errors, report.errors
    return list(report.document_ids)


def ingest_at_once(slug: str, paths: Sequence[Path]) -> list[str]:
    """Ingest files in one transaction, so the partitions sensor sees them all in one tick (and
    requests all their runs together)."""
    from lumikb_pipeline.db import catalog
    from lumikb_pipeline.db.session import session_scope

    with session_scope(database_url()) as session:
        kb = catalog.get_kb(session, slug)
        return [catalog.ingest_file(session, kb, path, 400)[1] for path in paths]


def ingest_as_extracted(slug: str, paths: Sequence[Path]) -> list[str]:
    """Ingest files and record them as already extracted at the KB's current version, in one
    transaction (so the partitions sensor never sees them as new)."""
    from lumikb_pipeline.db import catalog, ledger
    from lumikb_pipeline.db.session import session_scope

    with session_scope(database_url()) as session:
        kb = catalog.get_kb(session, slug)
        ids = [catalog.ingest_file(session, kb, path, 400)[1] for path in paths]
        ledger.ensure_records(session, kb.id, ids, kb.current_schema_version)
        for doc_id in ids:
            assert ledger.claim(session, doc_id, kb.current_schema_version, "test-seed")
            ledger.mark_succeeded(session, doc_id, kb.current_schema_version, "test-seed", ledger.Outcome())
    return ids


def ledger_counts(slug: str) -> Counter[tuple[int, str]]:
    """(schema version, status) -> rows, for one KB."""
    from lumikb_pipeline.db.models import ExtractionRecord, KnowledgeBase
    from lumikb_pipeline.db.session import session_scope

    with session_scope(database_url()) as session:
        rows = session.execute(
            select(ExtractionRecord.schema_version, ExtractionRecord.status, func.count())
            .join(KnowledgeBase, KnowledgeBase.id == ExtractionRecord.kb_id)
            .where(KnowledgeBase.slug == slug)
            .group_by(ExtractionRecord.schema_version, ExtractionRecord.status)
        ).all()
    return Counter({(version, status.value): count for version, status, count in rows})


def ledger_rows(doc_ids: Iterable[str], version: int) -> dict[str, Any]:
    from lumikb_pipeline.db import ledger
    from lumikb_pipeline.db.session import session_scope

    with session_scope(database_url()) as session:
        rows = ledger.records_for(session, list(doc_ids), version)
        for row in rows.values():
            session.expunge(row)
    return rows


def celery_workers(instance: Any, run_id: str) -> Counter[str]:
    """Which Celery worker (by name, `<queue>@host`) executed how many steps of a run."""
    from dagster import DagsterEventType

    workers: Counter[str] = Counter()
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        metadata = record.dagster_event.engine_event_data.metadata
        if "Celery worker" in metadata:
            workers[str(metadata["Celery worker"].value)] += 1
    return workers


def submitted_queues(instance: Any, run_id: str) -> Counter[str]:
    """The queues the run's executor submitted its steps to (from its engine events)."""
    from dagster import DagsterEventType

    queues: Counter[str] = Counter()
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        message = record.dagster_event.message or ""
        if message.startswith("Submitting celery task") and " to queue " in message:
            queues[message.rsplit(" to queue ", 1)[1].strip('".')] += 1
    return queues


def step_intervals(instance: Any, run_ids: Iterable[str], step_key: str) -> list[tuple[float, float]]:
    """(start, end) of every execution of a step in some runs, from STEP_START to its end event."""
    from dagster import DagsterEventType

    intervals = []
    ends = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_UP_FOR_RETRY}
    for run_id in run_ids:
        start: float | None = None
        for record in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, *ends}):
            if record.step_key != step_key:
                continue
            if record.dagster_event_type == DagsterEventType.STEP_START:
                start = record.timestamp
            elif start is not None:
                intervals.append((start, record.timestamp))
                start = None
    return intervals


def steps_in_progress(instance: Any, run_ids: Iterable[str], step_key: str) -> int:
    """How many executions of a step in some runs have started and not ended."""
    from dagster import DagsterEventType

    ends = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_UP_FOR_RETRY}
    running = 0
    for run_id in run_ids:
        records = [r for r in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, *ends})
                   if r.step_key == step_key]
        running += bool(records) and records[-1].dagster_event_type == DagsterEventType.STEP_START
    return running


def failed_runs_report(instance: Any, runs: Iterable[Any], limit: int = 5) -> str:
    """What went wrong in the runs that did not succeed: each one's step failures, run failure and
    engine errors from its event log (for assertion messages)."""
    from dagster import DagsterEventType, DagsterRunStatus

    kinds = {DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE, DagsterEventType.ENGINE_EVENT}
    lines = []
    bad = [run for run in runs if run.status != DagsterRunStatus.SUCCESS]
    for run in bad[:limit]:
        lines.append(f"run {run.run_id} {run.status.value} (parent {run.parent_run_id}):")
        for record in instance.all_logs(run.run_id, of_type=kinds):
            event = record.dagster_event
            data = event.event_specific_data
            error = getattr(data, "error", None)
            if event.event_type == DagsterEventType.ENGINE_EVENT and error is None:
                continue
            text = error.to_string() if error is not None else (event.message or "")
            lines.append(f"  {event.event_type_value} {record.step_key or ''}: {text[:1500]}")
    return "\n".join(lines) + (f"\n... and {len(bad) - limit} more" if len(bad) > limit else "")


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one time."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = peak = 0
    for _, delta in points:
        current += delta
        peak = max(peak, current)
    return peak


def partition_keys(doc_ids: Iterable[str], url: str | None = None) -> list[str]:
    """The `documents` partition keys of these documents (in the app database at `url`, default the
    environment's), in their order."""
    from lumikb_pipeline.db.partition_keys import partition_keys_of
    from lumikb_pipeline.db.session import session_scope

    ids = list(doc_ids)
    with session_scope(url or database_url()) as session:
        keys = partition_keys_of(session, ids)
    assert set(keys) == set(ids), f"not documents: {set(ids) - set(keys)}"
    return [keys[doc_id] for doc_id in ids]


def documents_of(keys: Iterable[str]) -> set[str]:
    """The document ids of these `documents` partition keys (a key of no document stays as it is)."""
    from lumikb_pipeline.db.partition_keys import documents_of_partitions
    from lumikb_pipeline.db.session import session_scope

    keys = list(keys)
    with session_scope(database_url()) as session:
        documents = documents_of_partitions(session, keys)
    return {documents.get(key, key) for key in keys}


def materialized_partitions(instance: Any) -> set[str]:
    """The documents (ids) whose `document_entities` partition is materialized."""
    from dagster import AssetKey

    return documents_of(instance.get_materialized_partitions(AssetKey("document_entities")))


def partition_status(instance: Any) -> tuple[set[str], set[str]]:
    """(materialized, failed) documents (ids) of `document_entities` partitions, as the UI shows them."""
    from dagster import AssetKey
    from dagster._core.definitions.partitions.context import partition_loading_context
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    from lumikb_pipeline.assets import documents_partitions

    with partition_loading_context(dynamic_partitions_store=instance):
        value = get_and_update_asset_status_cache_value(instance, AssetKey("document_entities"), documents_partitions)
        assert value is not None
        materialized = set(value.deserialize_materialized_partition_subsets(documents_partitions).get_partition_keys())
        failed = set(value.deserialize_failed_partition_subsets(documents_partitions).get_partition_keys())
    return documents_of(materialized), documents_of(failed)


def ui_partition_filter(keys: Iterable[str], search: str) -> list[str]:
    """The Dagster UI's partition search on an asset page, as the UI does it (ui-core
    assets/AssetPartitions.tsx: `keys.filter((key) => key.toLowerCase().includes(searchLower))`,
    `searchLower` the search text lowercased and trimmed)."""
    needle = search.lower().strip()
    return [key for key in keys if needle in key.lower()]
