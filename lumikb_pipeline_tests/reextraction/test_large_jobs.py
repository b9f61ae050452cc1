"""A job over more documents than PostgreSQL takes parameters in one statement (65,535): `lumikb
reextract --all` of 100,000 documents failed with "the number of query arguments cannot exceed 65535"
(benchmarks.scale, 2026-11-30). Every statement that names a job's documents goes in pages."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, insert, select

from lumikb_pipeline.core.config import load_settings
from lumikb_pipeline.db import catalog
from lumikb_pipeline.db.models import Document, ExtractionRecord, ExtractionStatus, utcnow
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.partition_keys import document_partition_key
from lumikb_pipeline.domain.schema import parse_schema_text
from lumikb_pipeline.reextraction.service import Selection, select_documents, start_reextraction

DOCUMENTS = 70_000  # over 65,535
SCHEMA = """
entity_types:
  - name: Organization
relationship_types: []
"""


@pytest.mark.slow
def test_a_job_over_70000_documents_starts_and_names_them_by_id_or_partition_key(
    pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUMIKB_DATABASE_URL", pg_url)
    monkeypatch.setenv("LUMIKB_REDIS_URL", redis_url)
    settings = load_settings()
    with session_scope(pg_url) as session:
        kb_id = catalog.create_kb(session, "big", parse_schema_text(SCHEMA)).id
    ids = [str(uuid.uuid4()) for _ in range(DOCUMENTS)]
    now = utcnow()
    with session_scope(pg_url) as session:
        for start in range(0, DOCUMENTS, 5000):
            session.execute(insert(Document), [
                {"id": doc_id, "kb_id": kb_id, "title": f"Filing {i}", "source": f"filings/{i}.txt",
                 "partition_key": document_partition_key("big", f"Filing {i}", doc_id),
                 "content_hash": f"{i:064x}", "revision": 1, "created_at": now, "updated_at": now}
                for i, doc_id in enumerate(ids[start : start + 5000], start)
            ])

    job = start_reextraction(settings, "big", Selection.all(), launch=False)

    assert job.total_documents == DOCUMENTS
    with session_scope(pg_url) as session:
        rows = session.scalar(select(func.count()).select_from(ExtractionRecord).where(
            ExtractionRecord.job_id == job.id, ExtractionRecord.status == ExtractionStatus.PENDING))
        assert rows == DOCUMENTS
        kb = catalog.get_kb(session, "big")
        keys = list(session.scalars(select(Document.partition_key).where(Document.id.in_(ids[:1000]))))
        named = ids[1000:DOCUMENTS] + keys  # 69,000 ids and 1,000 partition keys
        assert sorted(select_documents(session, kb, Selection.of_ids(named))) == sorted(ids)
