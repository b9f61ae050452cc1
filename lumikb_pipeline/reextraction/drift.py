"""Schema drift: how many live documents of each KB are outdated (PRODUCT.md section 1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.catalog import get_kb
from lumikb_pipeline.db.models import Document, KnowledgeBase


@dataclass(frozen=True)
class KbDrift:
    """One entry of `lumikb drift --json`."""

    kb: str
    schema_version: int
    documents: int
    outdated: int

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def drift_report(session: Session, slug: str | None = None) -> list[KbDrift]:
    """Outdated documents per KB (one KB when `slug` is given), ordered by slug."""
    kbs = [get_kb(session, slug)] if slug else list(session.scalars(select(KnowledgeBase).order_by(KnowledgeBase.slug)))
    report = []
    for kb in kbs:
        documents = session.scalar(
            select(func.count()).select_from(Document).where(Document.kb_id == kb.id, Document.deleted_at.is_(None))
        )
        report.append(
            KbDrift(kb=kb.slug, schema_version=kb.current_schema_version, documents=documents or 0,
                    outdated=len(ledger.outdated_document_ids(session, kb)))
        )
    return report
