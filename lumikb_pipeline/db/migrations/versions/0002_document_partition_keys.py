"""documents.partition_key: each document's readable Dagster partition key

Existing documents get the key a new document would get (`domain.partition_keys`: KB slug, a slug of
the title, then of the file name, and a short id), in ingestion order, taking more id digits where
a key is already taken. The `documents` partitions of a Dagster instance still keyed by document id
are replaced by the document partitions sensor on its next full comparison (docs/dagster.md).

Revision ID: 0002_document_partition_keys
Revises: 0001
Create Date: 2026-11-30 08:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from lumikb_pipeline.domain.partition_keys import MAX_KEY_LENGTH, SHORT_ID_DIGITS, document_partition_key

revision: str = "0002_document_partition_keys"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_documents = sa.table(
    "documents",
    sa.column("id", sa.String), sa.column("kb_id", sa.Integer), sa.column("title", sa.String),
    sa.column("source", sa.String), sa.column("created_at", sa.DateTime), sa.column("partition_key", sa.String),
)
_kbs = sa.table("knowledge_bases", sa.column("id", sa.Integer), sa.column("slug", sa.String))


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("partition_key", sa.String(length=MAX_KEY_LENGTH), nullable=True))
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(_documents.c.id, _kbs.c.slug, _documents.c.title, _documents.c.source)
        .join(_kbs, _kbs.c.id == _documents.c.kb_id)
        .order_by(_documents.c.created_at, _documents.c.id)
    ).all()
    taken: set[str] = set()
    keys: list[dict[str, str]] = []
    for doc_id, slug, title, source in rows:
        for digits in (SHORT_ID_DIGITS, 12, 16, 32):
            key = document_partition_key(slug, title or "", doc_id, source=source or "", id_digits=digits)
            if key not in taken:
                break
        taken.add(key)
        keys.append({"doc_id": doc_id, "key": key})
    if keys:
        update = _documents.update().where(_documents.c.id == sa.bindparam("doc_id"))
        connection.execute(update.values(partition_key=sa.bindparam("key")), keys)
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.alter_column("partition_key", existing_type=sa.String(length=MAX_KEY_LENGTH), nullable=False)
        batch_op.create_unique_constraint("uq_documents_partition_key", ["partition_key"])


def downgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_constraint("uq_documents_partition_key", type_="unique")
        batch_op.drop_column("partition_key")
