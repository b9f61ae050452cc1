"""Keeping the `documents` partitions in step with the app database (the logic behind
`document_partitions_sensor`).

Each tick reads the documents changed since the cursor (`updated_at`, then id: adds, content
changes and soft deletes all move `updated_at`), in pages. Every so often it also compares the
whole partition list with the live documents, which catches anything a concurrent transaction
committed behind the cursor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from lumikb_pipeline.db.models import Document, ExtractionRecord, ExtractionStatus, KnowledgeBase
from lumikb_pipeline.db.paging import one_of, pages

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class SyncCursor:
    """Where the sensor is: the last (updated_at, id) handled and the last full comparison."""

    updated_at: datetime = EPOCH
    doc_id: str = ""
    reconciled_at: datetime = EPOCH

    def serialize(self) -> str:
        return json.dumps(
            {"updated_at": self.updated_at.isoformat(), "doc_id": self.doc_id,
             "reconciled_at": self.reconciled_at.isoformat()}
        )

    @classmethod
    def parse(cls, text: str | None) -> SyncCursor:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            updated_at=datetime.fromisoformat(data["updated_at"]),
            doc_id=data.get("doc_id", ""),
            reconciled_at=datetime.fromisoformat(data.get("reconciled_at", EPOCH.isoformat())),
        )


@dataclass(frozen=True)
class DocumentChange:
    """One document as the sensor saw it."""

    doc_id: str
    kb_slug: str
    deleted: bool
    partition_key: str = ""


@dataclass(frozen=True)
class StalePartition:
    """A `documents` partition with no live document: the document it was (None: none is known)
    and the KB whose graph holds that document's contribution (None: leave the graph alone)."""

    doc_id: str | None
    kb_slug: str | None


@dataclass
class SyncPage:
    """The changes of one tick and the cursor after them."""

    changes: list[DocumentChange] = field(default_factory=list)
    cursor: SyncCursor = field(default_factory=SyncCursor)
    more: bool = False


def changed_documents(session: Session, cursor: SyncCursor, limit: int) -> SyncPage:
    """Documents whose `updated_at` is after the cursor, oldest first, at most `limit`."""
    rows = session.execute(
        select(Document.id, Document.updated_at, Document.deleted_at, KnowledgeBase.slug, Document.partition_key)
        .join(KnowledgeBase, KnowledgeBase.id == Document.kb_id)
        .where(
            or_(
                Document.updated_at > cursor.updated_at,
                and_(Document.updated_at == cursor.updated_at, Document.id > cursor.doc_id),
            )
        )
        .order_by(Document.updated_at, Document.id)
        .limit(limit)
    ).all()
    page = SyncPage(cursor=SyncCursor(cursor.updated_at, cursor.doc_id, cursor.reconciled_at), more=len(rows) == limit)
    for doc_id, updated_at, deleted_at, slug, key in rows:
        page.changes.append(DocumentChange(doc_id, slug, deleted_at is not None, key))
        page.cursor.updated_at, page.cursor.doc_id = updated_at, doc_id
    return page


def needing_processing(session: Session, doc_ids: Sequence[str]) -> list[str]:
    """Of these live documents, those that no extraction has covered at their current revision
    (new, or changed since): normal processing's work. Documents merely behind their KB's schema
    are re-extraction's work and are left out."""
    ids = list(doc_ids)
    done: set[str] = set()
    for page in pages(ids):
        done.update(
            session.scalars(
                select(ExtractionRecord.document_id)
                .join(Document, Document.id == ExtractionRecord.document_id)
                .where(
                    one_of(session, ExtractionRecord.document_id, page),
                    ExtractionRecord.document_revision >= Document.revision,
                    ExtractionRecord.status.in_([ExtractionStatus.SUCCEEDED, ExtractionStatus.RUNNING]),
                )
            )
        )
    return [doc_id for doc_id in doc_ids if doc_id not in done]


def live_documents(session: Session) -> list[tuple[str, str]]:
    """Every live document (id, partition key), in ingestion order."""
    return [
        (doc_id, key)
        for doc_id, key in session.execute(
            select(Document.id, Document.partition_key)
            .where(Document.deleted_at.is_(None))
            .order_by(Document.created_at, Document.id)
        ).all()
    ]


def changed_since_extraction(session: Session) -> list[str]:
    """Live documents whose newest extraction of any kind is of an older revision (changed content
    that normal processing has not picked up)."""
    newest = (
        select(ExtractionRecord.document_id, func.max(ExtractionRecord.document_revision).label("revision"))
        .where(ExtractionRecord.status.in_([ExtractionStatus.SUCCEEDED, ExtractionStatus.RUNNING,
                                            ExtractionStatus.PENDING]))
        .group_by(ExtractionRecord.document_id)
        .subquery()
    )
    return list(
        session.scalars(
            select(Document.id)
            .join(newest, newest.c.document_id == Document.id)
            .where(Document.deleted_at.is_(None), newest.c.revision < Document.revision)
            .order_by(Document.created_at, Document.id)
        )
    )


def stale_partitions(session: Session, partition_keys: Iterable[str]) -> dict[str, StalePartition]:
    """What each of these partition keys, none of them a live document's key, was: a deleted
    document (its graph contribution goes with the partition), a live document's id (a partition of
    the time before readable keys: the partition goes, the graph stays), or nothing known."""
    keys = list(partition_keys)
    rows: list[tuple[str, str, str, datetime | None]] = []
    for page in pages(keys):  # all of them once, when an instance moves to readable keys
        rows += session.execute(
            select(Document.id, Document.partition_key, KnowledgeBase.slug, Document.deleted_at)
            .join(KnowledgeBase, KnowledgeBase.id == Document.kb_id)
            .where(or_(one_of(session, Document.partition_key, page), one_of(session, Document.id, page)))
        ).tuples().all()
    by_key = {key: (doc_id, slug, deleted_at) for doc_id, key, slug, deleted_at in rows}
    by_id = {doc_id: (doc_id, slug, deleted_at) for doc_id, _key, slug, deleted_at in rows}
    stale: dict[str, StalePartition] = {}
    for key in keys:
        found = by_key.get(key) or by_id.get(key)
        if found is None:
            stale[key] = StalePartition(None, None)
        else:
            doc_id, slug, deleted_at = found
            stale[key] = StalePartition(doc_id, slug if deleted_at is not None else None)
    return stale
