"""Backfills of `document_entities` launched outside lumikb (the Dagster UI): the documents they
cover and the jobs (trigger `ui-backfill`, one per KB) that give them ledger rows, progress, cancel
and a budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dagster import AssetKey
from sqlalchemy import select

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import DOCUMENT_ENTITIES_ASSET, REEXTRACTION_JOB, TAG_JOB_ID, TAG_MODE
from lumikb_pipeline.db.models import Document, Job, JobTrigger, KnowledgeBase
from lumikb_pipeline.db.paging import one_of, pages
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.reextraction.service import Selection, start_reextraction

if TYPE_CHECKING:
    from dagster import DagsterInstance


def backfill_partitions(backfill: Any) -> list[str]:
    """The `document_entities` partitions (documents' partition keys) a Dagster backfill targets: an asset backfill's
    partitions of that asset, or a job backfill's partitions (`reextraction_job` from its job page);
    [] for a backfill of anything else."""
    data = backfill.asset_backfill_data
    if data is None:
        return sorted(backfill.partition_names or []) if backfill.job_name == REEXTRACTION_JOB else []
    subset = data.target_subset.partitions_subsets_by_asset_key.get(AssetKey(DOCUMENT_ENTITIES_ASSET))
    return sorted(subset.get_partition_keys()) if subset is not None else []


def ui_backfill_jobs(
    settings: Settings, instance: DagsterInstance, backfill_id: str, doc_ids: Sequence[str]
) -> dict[str, str]:
    """{document id: job id} for `doc_ids` of a backfill of `document_entities` launched outside
    lumikb (the Dagster UI). The backfill's jobs are recorded first if one of these documents' KBs
    has none yet (`record_backfill_jobs`); otherwise this is one small query, as each run of the
    backfill asks it twice. Documents that are not live documents are left out.
    """
    with session_scope(settings.effective_database_url) as session:
        jobs = {job.kb_id: job.id for job in session.scalars(select(Job).where(Job.dagster_backfill_id == backfill_id))}
        kb_of: dict[str, int] = {}
        for page in pages(doc_ids):
            kb_of.update(session.execute(
                select(Document.id, Document.kb_id)
                .where(one_of(session, Document.id, page), Document.deleted_at.is_(None))
            ).tuples().all())
    if not set(kb_of.values()) <= jobs.keys():
        jobs = record_backfill_jobs(settings, instance, backfill_id)
    return {doc_id: jobs[kb_id] for doc_id, kb_id in kb_of.items() if kb_id in jobs}


def record_backfill_jobs(settings: Settings, instance: DagsterInstance, backfill_id: str) -> dict[int, str]:
    """Record the jobs of a backfill of `document_entities` launched outside lumikb (idempotent), one
    per KB of its live documents (trigger `ui-backfill`, target the KB's current schema version, mode
    from the backfill's `lumikb/mode` tag, default replace); returns {KB id: job id}, empty for a
    backfill lumikb launched itself."""
    backfill = instance.get_backfill(backfill_id)
    if backfill is None or backfill.tags.get(TAG_JOB_ID):
        return {}
    with session_scope(settings.effective_database_url) as session:
        jobs = {job.kb_id: job.id for job in session.scalars(select(Job).where(Job.dagster_backfill_id == backfill_id))}
        partitions = backfill_partitions(backfill)
        by_kb: dict[tuple[int, str], list[str]] = {}
        for page in pages(partitions):
            rows = session.execute(
                select(Document.id, KnowledgeBase.id, KnowledgeBase.slug)
                .join(KnowledgeBase, KnowledgeBase.id == Document.kb_id)
                .where(one_of(session, Document.partition_key, page), Document.deleted_at.is_(None))
            ).tuples()
            for doc_id, kb_id, slug in rows:
                by_kb.setdefault((kb_id, slug), []).append(doc_id)
    for (kb_id, slug), docs in by_kb.items():
        if kb_id not in jobs:
            jobs[kb_id] = start_reextraction(
                settings, slug, Selection.of_ids(docs), backfill.tags.get(TAG_MODE, WriteMode.REPLACE),
                JobTrigger.UI_BACKFILL, dedupe_key=f"ui-backfill:{backfill_id}:{slug}", backfill_id=backfill_id,
            ).id
    return jobs


def record_ui_backfills(settings: Settings, instance: DagsterInstance) -> list[str]:
    """Record the jobs of every requested backfill of `document_entities` that lumikb did not launch
    and has no job yet; returns those backfills' ids."""
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    recorded = []
    for backfill in instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])):
        if backfill.tags.get(TAG_JOB_ID) or not backfill_partitions(backfill):
            continue
        with session_scope(settings.effective_database_url) as session:
            known = session.scalar(select(Job.id).where(Job.dagster_backfill_id == backfill.backfill_id).limit(1))
        if known is None and record_backfill_jobs(settings, instance, backfill.backfill_id):
            recorded.append(backfill.backfill_id)
    return recorded
