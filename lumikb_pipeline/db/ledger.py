"""The extraction ledger: one row per (document, schema version), the source of truth for progress.

Every state change is one conditional UPDATE, so it is atomic and safe under concurrent workers:
two workers can never both claim the same document (the second UPDATE finds the row no longer
claimable). A claim is a lease: a row left `running` by a dead worker can be claimed again once its
lease has expired. The claimant renews its lease while it works (`renew`), so an expired lease
means the claimant stopped; `reap_abandoned` closes such rows once their claimant is known gone, and
a document whose attempts keep dying is given up after `MAX_ATTEMPTS` (`give_up_if_dying`).

A claim for a job only succeeds while the job is pending or running: a late redelivery of a step of
an ended job claims nothing and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    String,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from lumikb_pipeline.core.errors import UsageError
from lumikb_pipeline.db.models import (
    Document,
    ExtractionRecord,
    ExtractionStatus,
    Job,
    JobStatus,
    KnowledgeBase,
    utcnow,
)
from lumikb_pipeline.db.paging import one_of, pages

DEFAULT_LEASE = timedelta(minutes=30)
# Claims of one document in one job after which a claim that finds the row still `running` (the
# attempt before died without finishing: out of memory, a killed worker) gives up instead.
MAX_ATTEMPTS = 3
ACTIVE_JOB = (JobStatus.PENDING, JobStatus.RUNNING)
# Jobs whose documents may still be worked on: a failed job's failed documents are redone by Dagster's
# run retries and re-executions from failure; a cancelled or succeeded job takes no more work.
TAKES_WORK = (*ACTIVE_JOB, JobStatus.FAILED)
CLAIMABLE = (ExtractionStatus.PENDING, ExtractionStatus.FAILED, ExtractionStatus.CANCELLED)


@dataclass(frozen=True)
class Outcome:
    """What one document's extraction produced, written to its ledger row."""

    entity_count: int = 0
    relationship_count: int = 0
    llm_calls: int = 0
    cached_chunks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def _not_held_by_another_job(job_id: str) -> ColumnElement[bool]:
    """The row belongs to no job, to `job_id`, or to a job that has ended: another job that is still
    going keeps its rows (taking one would leave that job waiting forever for a document it lost)."""
    active = select(Job.id).where(Job.status.in_(ACTIVE_JOB), Job.id != job_id)
    return or_(ExtractionRecord.job_id.is_(None), ExtractionRecord.job_id.not_in(active))


def documents_in_other_jobs(
    session: Session, doc_ids: Sequence[str], schema_version: int, job_id: str | None = None
) -> dict[str, str]:
    """Documents whose row at `schema_version` belongs to another job still going: {doc id: job id}."""
    held: dict[str, str] = {}
    for page in pages(doc_ids):
        rows = session.execute(
            select(ExtractionRecord.document_id, ExtractionRecord.job_id)
            .join(Job, Job.id == ExtractionRecord.job_id)
            .where(
                one_of(session, ExtractionRecord.document_id, page),
                ExtractionRecord.schema_version == schema_version,
                Job.status.in_(ACTIVE_JOB),
                Job.id != (job_id or ""),
            )
        ).tuples()
        held.update({doc_id: owner for doc_id, owner in rows if owner is not None})
    return held


def _job_takes_work(job_id: str) -> ColumnElement[bool]:
    return exists(select(Job.id).where(Job.id == job_id, Job.status.in_(TAKES_WORK)))


def job_takes_work(session: Session, job_id: str) -> bool:
    """True while a job's rows may still be claimed: it is pending or running, or it failed (a retry
    from failure redoes its failed documents); False once it succeeded or was cancelled."""
    return bool(session.scalar(select(_job_takes_work(job_id))))


def _insert(session: Session):  # noqa: ANN202 - returns the dialect's insert() construct
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def ensure_records(
    session: Session,
    kb_id: int,
    doc_ids: Sequence[str],
    schema_version: int,
    job_id: str | None = None,
    redo_succeeded: bool = False,
) -> None:
    """Create `pending` rows for documents at a schema version. Existing rows are left alone,
    except that a job takes over rows that are not running — and succeeded ones too (set back to
    `pending`) when `redo_succeeded` asks for a fresh extraction of every document."""
    if not doc_ids:
        return
    now = utcnow()
    # One INSERT ... SELECT per page of documents: the database makes the rows from the documents
    # (their revision included), and no row goes through Python (100,000 rows sent as parameters
    # took most of `lumikb reextract --all`'s 47 s). A new row is the job's at once; an existing row
    # is taken over in the same statement, through its unique index (separate UPDATEs by `IN` lists
    # of document ids took a second per 1,000 documents on a ledger the planner had no statistics
    # of yet).
    columns = ["kb_id", "document_id", "schema_version", "status", "document_revision", "job_id", "updated_at"]
    conflict = ["document_id", "schema_version"]
    taken_over = [*CLAIMABLE, ExtractionStatus.SKIPPED]
    if redo_succeeded:
        taken_over.append(ExtractionStatus.SUCCEEDED)
    for page in pages(doc_ids):
        rows = select(
            literal(kb_id, Integer), Document.id, literal(schema_version, Integer),
            literal(ExtractionStatus.PENDING.value, String), Document.revision, literal(job_id, String),
            literal(now, DateTime),
        ).where(one_of(session, Document.id, page))
        insert = _insert(session)(ExtractionRecord).from_select(columns, rows)
        if job_id is None:
            session.execute(insert.on_conflict_do_nothing(index_elements=conflict))
            continue
        session.execute(insert.on_conflict_do_update(
            index_elements=conflict,
            set_={
                "job_id": job_id, "status": ExtractionStatus.PENDING.value, "updated_at": now,
                # attempts count within one job: a new job starts from zero
                "attempts": case((ExtractionRecord.job_id == job_id, ExtractionRecord.attempts), else_=0),
            },
            where=and_(ExtractionRecord.status.in_(taken_over), _not_held_by_another_job(job_id),
                       _job_takes_work(job_id)),
        ))


def _claimable() -> ColumnElement[bool]:
    now = utcnow()
    return or_(
        ExtractionRecord.status.in_(CLAIMABLE),
        and_(ExtractionRecord.status == ExtractionStatus.RUNNING, ExtractionRecord.lease_expires_at < now),
    )


def claim(
    session: Session,
    doc_id: str,
    schema_version: int,
    worker: str,
    job_id: str | None = None,
    lease: timedelta = DEFAULT_LEASE,
) -> bool:
    """Atomically mark one document `running` for this worker; False when someone else holds it,
    it already succeeded at this revision, or `job_id` names a job that has ended."""
    now = utcnow()
    revision = session.scalar(select(Document.revision).where(Document.id == doc_id))
    if revision is None:
        return False
    # The same claimant may take its own running row again: a retried run (same claimant) after a
    # worker died mid-document must not wait for the lease to expire.
    condition = or_(
        _claimable(),
        and_(ExtractionRecord.status == ExtractionStatus.RUNNING, ExtractionRecord.claimed_by == worker),
    )
    # A succeeded row of an older revision (the document changed since) is claimable again.
    condition = or_(
        condition,
        and_(ExtractionRecord.status == ExtractionStatus.SUCCEEDED, ExtractionRecord.document_revision < revision),
    )
    fresh_revision = and_(
        ExtractionRecord.status == ExtractionStatus.SUCCEEDED, ExtractionRecord.document_revision < revision
    )
    values: dict[str, object] = {
        "status": ExtractionStatus.RUNNING, "claimed_by": worker, "lease_expires_at": now + lease,
        "started_at": now, "finished_at": None, "updated_at": now, "document_revision": revision,
        "attempts": case((fresh_revision, 1), else_=ExtractionRecord.attempts + 1),
    }
    if job_id is not None:
        values["job_id"] = job_id
        condition = and_(condition, _not_held_by_another_job(job_id), _job_takes_work(job_id))
    result = session.execute(
        update(ExtractionRecord)
        .where(
            ExtractionRecord.document_id == doc_id,
            ExtractionRecord.schema_version == schema_version,
            condition,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def give_up_if_dying(
    session: Session, doc_id: str, schema_version: int, worker: str, max_attempts: int = MAX_ATTEMPTS
) -> str | None:
    """Fail a document whose last `max_attempts` claims all died before finishing (the row is still
    `running`, by this worker or with an expired lease), instead of trying it again forever; returns
    the error recorded, or None when the document may be tried."""
    now = utcnow()
    error = (
        f"given up after {max_attempts} attempts: each attempt at document {doc_id} stopped without finishing "
        "(its worker died, e.g. out of memory or killed); fix the cause, then re-run the document with "
        f"`lumikb reextract SLUG --doc {doc_id}`"
    )
    result = session.execute(
        update(ExtractionRecord)
        .where(
            ExtractionRecord.document_id == doc_id,
            ExtractionRecord.schema_version == schema_version,
            ExtractionRecord.status == ExtractionStatus.RUNNING,
            or_(ExtractionRecord.claimed_by == worker, ExtractionRecord.lease_expires_at < now),
            ExtractionRecord.attempts >= max_attempts,
        )
        .values(status=ExtractionStatus.FAILED, last_error=error, finished_at=now, updated_at=now,
                lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return error if result.rowcount else None  # type: ignore[attr-defined]


def reap_abandoned(
    session: Session,
    claimant_gone: Callable[[str], bool | None],
    max_attempts: int = MAX_ATTEMPTS,
    limit: int = 1000,
) -> list[ExtractionRecord]:
    """Close `running` rows whose claimant is gone: each is marked `failed` with an error that says
    what happened, so its job can end. `claimant_gone` answers True (gone), False (alive) or None
    (unknown: then the row is abandoned once its lease has expired, as a live claimant renews its
    lease while it works). Returns the rows closed."""
    now = utcnow()
    running = list(
        session.scalars(
            select(ExtractionRecord)
            .where(ExtractionRecord.status == ExtractionStatus.RUNNING)
            .order_by(ExtractionRecord.id)
            .limit(limit)
        )
    )
    verdicts: dict[str, bool | None] = {}
    reaped = []
    for row in running:
        claimant = row.claimed_by or ""
        if claimant not in verdicts:
            verdicts[claimant] = claimant_gone(claimant)
        gone = verdicts[claimant]
        expired = row.lease_expires_at is None or row.lease_expires_at < now
        if not (gone or (gone is None and expired)):
            continue
        retried = "" if row.attempts < max_attempts else f" (attempt {row.attempts} of {max_attempts}: given up)"
        error = (
            f"abandoned: {claimant or 'its worker'} stopped before finishing document {row.document_id}"
            f"{retried}; a retry of the run, or `lumikb reextract SLUG --doc {row.document_id}`, extracts it again"
        )
        result = session.execute(
            update(ExtractionRecord)
            .where(
                ExtractionRecord.id == row.id,
                ExtractionRecord.status == ExtractionStatus.RUNNING,
                ExtractionRecord.claimed_by == row.claimed_by,
            )
            .values(status=ExtractionStatus.FAILED, last_error=error, finished_at=now, updated_at=now,
                    lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            session.refresh(row)
            reaped.append(row)
    return reaped


def renew(
    session: Session, doc_ids: Sequence[str], schema_version: int, worker: str, lease: timedelta = DEFAULT_LEASE
) -> set[str]:
    """Extend this worker's lease on its running rows (a heartbeat); returns the documents it still
    holds. A row missing from the answer was taken by someone else after its lease expired, or
    closed: the worker must leave that document alone. On PostgreSQL the renewed rows stay locked
    until the session commits, so a claim by another worker waits for (and then sees) this
    session's outcome: renewing in the transaction that records the result makes the claim
    check and the result one step."""
    if not doc_ids:
        return set()
    now = utcnow()
    renewed = session.execute(
        update(ExtractionRecord)
        .where(
            ExtractionRecord.document_id.in_(list(doc_ids)),
            ExtractionRecord.schema_version == schema_version,
            ExtractionRecord.status == ExtractionStatus.RUNNING,
            ExtractionRecord.claimed_by == worker,
        )
        .values(lease_expires_at=now + lease, updated_at=now)
        .returning(ExtractionRecord.document_id)
        .execution_options(synchronize_session=False)
    )
    return set(renewed.scalars())


def _finish(
    session: Session, doc_id: str, schema_version: int, worker: str, status: ExtractionStatus, **values: object
) -> bool:
    now = utcnow()
    result = session.execute(
        update(ExtractionRecord)
        .where(
            ExtractionRecord.document_id == doc_id,
            ExtractionRecord.schema_version == schema_version,
            ExtractionRecord.status == ExtractionStatus.RUNNING,
            ExtractionRecord.claimed_by == worker,
        )
        .values(status=status, finished_at=now, updated_at=now, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_succeeded(session: Session, doc_id: str, schema_version: int, worker: str, outcome: Outcome) -> bool:
    """Record a finished extraction; False if this worker no longer held the row."""
    return _finish(
        session, doc_id, schema_version, worker, ExtractionStatus.SUCCEEDED, last_error=None,
        entity_count=outcome.entity_count, relationship_count=outcome.relationship_count,
        llm_calls=outcome.llm_calls, cached_chunks=outcome.cached_chunks,
        prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
        cost_usd=outcome.cost_usd,
    )


def mark_failed(
    session: Session, doc_id: str, schema_version: int, worker: str, error: str, outcome: Outcome | None = None
) -> bool:
    """Record a failed extraction with its (already scrubbed) error."""
    extra: dict[str, object] = {}
    if outcome is not None:
        extra = {"llm_calls": outcome.llm_calls, "cost_usd": outcome.cost_usd,
                 "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens}
    return _finish(session, doc_id, schema_version, worker, ExtractionStatus.FAILED, last_error=error[:4000], **extra)


def mark_skipped(session: Session, doc_id: str, schema_version: int, worker: str, reason: str) -> bool:
    """Record that a claimed document was not written, and why (e.g. the graph already holds it at a
    newer schema version); the ledger row says so rather than claiming success."""
    return _finish(session, doc_id, schema_version, worker, ExtractionStatus.SKIPPED, last_error=reason[:4000])


def mark_cancelled(session: Session, doc_id: str, schema_version: int, worker: str, reason: str) -> bool:
    """Record that a claimed document was stopped before its graph changed."""
    return _finish(session, doc_id, schema_version, worker, ExtractionStatus.CANCELLED, last_error=reason)


def pending_document_ids(session: Session, job_id: str) -> list[str]:
    """The documents of a job that no worker has started."""
    return list(
        session.scalars(
            select(ExtractionRecord.document_id).where(
                ExtractionRecord.job_id == job_id, ExtractionRecord.status == ExtractionStatus.PENDING
            )
        )
    )


def cancel_pending(session: Session, job_id: str, reason: str = "job cancelled") -> int:
    """Mark every not-yet-started row of a job `cancelled`; returns how many."""
    now = utcnow()
    result = session.execute(
        update(ExtractionRecord)
        .where(ExtractionRecord.job_id == job_id, ExtractionRecord.status == ExtractionStatus.PENDING)
        .values(status=ExtractionStatus.CANCELLED, last_error=reason, updated_at=now, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def latest_succeeded_versions(
    session: Session, kb_id: int, doc_ids: Sequence[str] | None = None
) -> dict[str, int]:
    """Each document of a KB (or of `doc_ids`) with its latest succeeded schema version (absent: never)."""
    query = (
        select(ExtractionRecord.document_id, func.max(ExtractionRecord.schema_version))
        .where(ExtractionRecord.kb_id == kb_id, ExtractionRecord.status == ExtractionStatus.SUCCEEDED)
        .group_by(ExtractionRecord.document_id)
    )
    if doc_ids is None:
        return dict(session.execute(query).tuples().all())
    latest: dict[str, int] = {}
    for page in pages(doc_ids):
        latest.update(session.execute(query.where(one_of(session, ExtractionRecord.document_id, page))).tuples().all())
    return latest


def outdated_document_ids(session: Session, kb: KnowledgeBase) -> list[str]:
    """Live documents whose latest succeeded extraction is older than the KB's current schema
    version, or that have none (PRODUCT.md section 1).

    Asked as "no succeeded extraction at the current version or later", an anti-join on the
    (document, schema version) index: PostgreSQL plans it well with or without statistics. Asked as
    a join against each document's latest version (a grouped subquery), a KB bulk-loaded and not yet
    analysed got a plan quadratic in its documents: 9 s at 10,000.
    """
    current = (
        select(ExtractionRecord.id)
        .where(
            ExtractionRecord.document_id == Document.id,
            ExtractionRecord.status == ExtractionStatus.SUCCEEDED,
            ExtractionRecord.schema_version >= kb.current_schema_version,
        )
        .exists()
    )
    query = (
        select(Document.id)
        .where(Document.kb_id == kb.id, Document.deleted_at.is_(None), ~current)
        .order_by(Document.created_at, Document.id)
    )
    return list(session.scalars(query))


def find_job(session: Session, reference: str, *, for_update: bool = False) -> Job | None:
    """The job `reference` names: a job id, or the id of the Dagster backfill behind one job (what
    the Dagster UI shows for a backfill launched there). None when nothing matches; a backfill
    behind several jobs (its documents span KBs, one job each) is a `UsageError` listing them."""
    job = session.get(Job, reference, with_for_update=for_update)
    if job is not None:
        return job
    job_ids = list(session.scalars(select(Job.id).where(Job.dagster_backfill_id == reference).order_by(Job.id)))
    if len(job_ids) > 1:
        raise UsageError(
            f"backfill {reference} is behind {len(job_ids)} jobs, one per KB: {', '.join(job_ids)}; name one of them"
        )
    return session.get(Job, job_ids[0], with_for_update=for_update) if job_ids else None


def finish_job_if_done(session: Session, job_id: str) -> JobStatus | None:
    """Close a job whose every ledger row is final: `succeeded` when all succeeded, `cancelled` when
    it was cancelled (or stopped at its budget), else `failed`; a failed job whose failed documents
    a retry has since redone becomes `succeeded`. Returns the new status, or None while rows are
    still pending or running (or nothing changed)."""
    counts = status_counts(session, job_id)
    if counts[ExtractionStatus.PENDING] or counts[ExtractionStatus.RUNNING]:
        return None
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED):
        return None
    if job.status == JobStatus.FAILED and counts[ExtractionStatus.FAILED]:
        return None  # still failed; a retry that repairs every failed document makes it succeeded
    if job.cancel_requested_at is not None or counts[ExtractionStatus.CANCELLED]:
        job.status = JobStatus.CANCELLED
    elif counts[ExtractionStatus.FAILED]:
        job.status = JobStatus.FAILED
    else:
        job.status = JobStatus.SUCCEEDED
    job.finished_at = job.updated_at = utcnow()
    return job.status


def status_counts(session: Session, job_id: str) -> dict[ExtractionStatus, int]:
    """How many of a job's rows are in each status (the truth that progress is rebuilt from)."""
    rows = session.execute(
        select(ExtractionRecord.status, func.count())
        .where(ExtractionRecord.job_id == job_id)
        .group_by(ExtractionRecord.status)
    ).tuples()
    counts = dict.fromkeys(ExtractionStatus, 0)
    counts.update(dict(rows.all()))
    return counts


def records_for(session: Session, doc_ids: Iterable[str], schema_version: int) -> dict[str, ExtractionRecord]:
    """The ledger rows of some documents at one schema version, by document id."""
    rows = session.scalars(
        select(ExtractionRecord).where(
            ExtractionRecord.document_id.in_(list(doc_ids)), ExtractionRecord.schema_version == schema_version
        )
    )
    return {row.document_id: row for row in rows}
