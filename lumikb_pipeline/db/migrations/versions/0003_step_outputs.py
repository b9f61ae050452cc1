"""step outputs: the hand-over between a run's steps, in the app database

Revision ID: 0003_step_outputs
Revises: 0002_document_partition_keys
Create Date: 2026-11-30 08:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_step_outputs"
down_revision: str | None = "0002_document_partition_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dagster_step_outputs",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("step_key", sa.String(length=512), nullable=False),
        sa.Column("output_name", sa.String(length=255), nullable=False),
        sa.Column("mapping_key", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step_key", "output_name", "mapping_key"),
    )


def downgrade() -> None:
    op.drop_table("dagster_step_outputs")
