"""Documents and their Dagster partitions: the `documents` partition of a document is its
`partition_key` (set when the document is created, never changed: `domain.partition_keys`). Every
place that hands documents to Dagster, or reads them back from partition keys and run tags, maps
through these two functions."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from lumikb_pipeline.db.models import Document
from lumikb_pipeline.db.paging import one_of, pages


def partition_keys_of(session: Session, doc_ids: Iterable[str]) -> dict[str, str]:
    """{document id: partition key} of these documents (ids of no document are left out)."""
    ids = list(dict.fromkeys(doc_ids))
    keys: dict[str, str] = {}
    for page in pages(ids):
        keys.update(
            session.execute(
                select(Document.id, Document.partition_key).where(one_of(session, Document.id, page))
            ).tuples().all()
        )
    return keys


def documents_of_partitions(session: Session, partition_keys: Iterable[str]) -> dict[str, str]:
    """{partition key: document id} of these partition keys (keys of no document are left out)."""
    keys = list(dict.fromkeys(partition_keys))
    documents: dict[str, str] = {}
    for page in pages(keys):
        documents.update(
            session.execute(
                select(Document.partition_key, Document.id).where(one_of(session, Document.partition_key, page))
            ).tuples().all()
        )
    return documents
