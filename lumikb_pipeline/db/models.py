"""The app database (PRODUCT.md section 1): knowledge bases, schema versions, documents, chunks,
the extraction ledger, jobs, chunk checkpoints and run-time settings.

The same typed models run on PostgreSQL (production, tests) and SQLite (the embedded default).
Migrations live in `lumikb_pipeline/db/migrations`; change both together.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
    select,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.partition_keys import MAX_KEY_LENGTH, SHORT_ID_DIGITS, document_partition_key


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use lumikb_pipeline.db.models.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class ExtractionStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobTrigger(enum.StrEnum):
    UI_BACKFILL = "ui-backfill"
    SENSOR = "sensor"
    SCHEDULE = "schedule"
    CLI = "cli"


def _enum(cls: type[enum.Enum], name: str | None = None) -> Enum:
    # Stored as plain strings (no native PG enum) so a new status is a code change, not a type migration.
    return Enum(cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class KnowledgeBase(Base):
    __tablename__ = "knowledge_bases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    current_schema_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    schema_versions: Mapped[list[SchemaVersion]] = relationship(
        back_populates="kb", order_by="SchemaVersion.version", cascade="all, delete-orphan", passive_deletes=True
    )


class SchemaVersion(Base):
    __tablename__ = "schema_versions"
    __table_args__ = (UniqueConstraint("kb_id", "version", name="uq_schema_versions_kb_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kb_id: Mapped[int] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    kb: Mapped[KnowledgeBase] = relationship(back_populates="schema_versions")


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("kb_id", "source", name="uq_documents_kb_source"),
        UniqueConstraint("partition_key", name="uq_documents_partition_key"),
        Index("ix_documents_kb_updated", "kb_id", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kb_id: Mapped[int] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(512))
    source: Mapped[str] = mapped_column(String(2048))
    content_hash: Mapped[str] = mapped_column(String(64))
    # Bumped when the content changes, so a changed document is re-extracted at the same schema version.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    # The document's Dagster partition key (`domain.partition_keys`), set when the row is inserted
    # (`_assign_partition_key`) and never changed.
    partition_key: Mapped[str] = mapped_column(String(MAX_KEY_LENGTH))

    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="document", order_by="Chunk.ordinal", cascade="all, delete-orphan"
    )


@event.listens_for(Document, "before_insert")
def _assign_partition_key(_mapper: Mapper[Document], connection: Connection, document: Document) -> None:
    """Give a new document its partition key from its KB, title (or source) and id; a key already
    taken (two documents of a KB with the same title and the same first id digits) takes more
    digits of the id."""
    if document.partition_key:
        return
    if document.id is None:
        document.id = new_id()
    kb_slug = connection.scalar(select(KnowledgeBase.slug).where(KnowledgeBase.id == document.kb_id)) or ""
    for digits in (SHORT_ID_DIGITS, 12, 16, 32):
        key = document_partition_key(kb_slug, document.title or "", document.id, source=document.source or "",
                                     id_digits=digits)
        if connection.scalar(select(Document.id).where(Document.partition_key == key).limit(1)) is None:
            break
    document.partition_key = key


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("document_id", "ordinal", name="uq_chunks_document_ordinal"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))

    document: Mapped[Document] = relationship(back_populates="chunks")


class ExtractionRecord(Base):
    """The ledger: one row per (document, schema version)."""

    __tablename__ = "extraction_records"
    __table_args__ = (
        UniqueConstraint("document_id", "schema_version", name="uq_extraction_records_doc_version"),
        Index("ix_extraction_records_job_status", "job_id", "status"),
        Index("ix_extraction_records_kb_status", "kb_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kb_id: Mapped[int] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    schema_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[ExtractionStatus] = mapped_column(_enum(ExtractionStatus), default=ExtractionStatus.PENDING)
    # The document revision this row extracted (or is extracting); a newer revision makes it stale.
    document_revision: Mapped[int] = mapped_column(Integer, default=1)
    entity_count: Mapped[int] = mapped_column(Integer, default=0)
    relationship_count: Mapped[int] = mapped_column(Integer, default=0)
    llm_calls: Mapped[int] = mapped_column(Integer, default=0)
    cached_chunks: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    claimed_by: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One re-extraction of a set of documents, and the Dagster runs or backfill behind it."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_kb_status", "kb_id", "status"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kb_id: Mapped[int] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    target_schema_version: Mapped[int] = mapped_column(Integer)
    mode: Mapped[WriteMode] = mapped_column(_enum(WriteMode, "jobmode"), default=WriteMode.REPLACE)
    selection: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"kind": "outdated"|"all"|"ids", "ids": [...]}
    trigger: Mapped[JobTrigger] = mapped_column(_enum(JobTrigger))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.PENDING)
    # Unique when set: the sensor's "one job per KB and schema version", across ticks and restarts.
    dedupe_key: Mapped[str | None] = mapped_column(String(255), unique=True, default=None)
    total_documents: Mapped[int] = mapped_column(Integer, default=0)
    max_cost_usd: Mapped[float | None] = mapped_column(Float, default=None)
    dagster_run_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    dagster_backfill_id: Mapped[str | None] = mapped_column(String(64), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChunkCheckpoint(Base):
    """The validated LLM result for (KB, chunk content hash, schema version, prompt version, model).

    The KB is part of the key because schema version numbers are per KB: version 2 of two KBs are
    different schemas.
    """

    __tablename__ = "chunk_checkpoints"
    __table_args__ = (
        UniqueConstraint(
            "kb_id", "chunk_hash", "schema_version", "prompt_version", "model", name="uq_chunk_checkpoints_key"
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kb_id: Mapped[int] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    chunk_hash: Mapped[str] = mapped_column(String(64))
    schema_version: Mapped[int] = mapped_column(Integer)
    prompt_version: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AppSetting(Base):
    """Run-time settings changed by the CLI without a redeploy (e.g. the drift schedule's cron)."""

    __tablename__ = "app_settings"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class StepOutput(Base):
    """One output of one Dagster step of one run, handed to the run's next step through this table
    (`resources.StepOutputIOManager`) instead of a folder every machine would have to share.

    Short-lived: a run's rows are deleted once it succeeded, or by the run retention rule
    (`infra.run_retention`) after it failed, so a retry from failure can still read them.
    """

    __tablename__ = "dagster_step_outputs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    output_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    # "" for an ordinary output; the mapping key of a dynamic output otherwise.
    mapping_key: Mapped[str] = mapped_column(String(255), primary_key=True, default="")
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
