"""The extraction ledger: atomic state changes, safe under concurrent workers."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import pytest
from sqlalchemy import select

from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.catalog import create_kb
from lumikb_pipeline.db.models import Document, ExtractionRecord, ExtractionStatus, Job, JobTrigger, KnowledgeBase
from lumikb_pipeline.db.session import dispose_engines, session_scope
from lumikb_pipeline.domain.schema import parse_schema_text

SCHEMA = parse_schema_text("entity_types:\n  - name: Person\n")


def _seed(url: str, documents: int) -> tuple[int, list[str], str]:
    with session_scope(url) as session:
        kb = create_kb(session, "acme", SCHEMA)
        docs = [Document(kb_id=kb.id, title=f"d{i}", source=f"/d{i}", content_hash="h") for i in range(documents)]
        session.add_all(docs)
        job = Job(kb_id=kb.id, target_schema_version=1, selection={"kind": "all"}, trigger=JobTrigger.CLI)
        session.add(job)
        session.flush()
        ledger.ensure_records(session, kb.id, [d.id for d in docs], 1, job.id)
        return kb.id, [d.id for d in docs], job.id


def test_a_document_is_claimed_once_and_then_finished_by_its_claimant(db_url: str) -> None:
    _, doc_ids, job_id = _seed(db_url, 1)
    doc = doc_ids[0]
    with session_scope(db_url) as session:
        assert ledger.claim(session, doc, 1, "worker-a", job_id)
        assert not ledger.claim(session, doc, 1, "worker-b", job_id)
        assert not ledger.mark_succeeded(session, doc, 1, "worker-b", ledger.Outcome(entity_count=3))
        assert ledger.mark_succeeded(session, doc, 1, "worker-a", ledger.Outcome(entity_count=3, llm_calls=2))
        record = session.scalars(select(ExtractionRecord)).one()
        assert record.status == ExtractionStatus.SUCCEEDED
        assert (record.entity_count, record.llm_calls, record.attempts) == (3, 2, 1)
        assert record.finished_at is not None and record.finished_at >= record.started_at  # type: ignore[operator]
        # Succeeded at the current revision: not claimable again (a retried step skips it) ...
        assert not ledger.claim(session, doc, 1, "worker-c", job_id)
        # ... until the document changes.
        session.get_one(Document, doc).revision += 1
        session.flush()
        assert ledger.claim(session, doc, 1, "worker-c", job_id)


def test_a_retried_run_takes_back_its_own_running_row_at_once(db_url: str) -> None:
    _, [doc], job_id = _seed(db_url, 1)
    with session_scope(db_url) as session:
        assert ledger.claim(session, doc, 1, "run-1", job_id)
        assert not ledger.claim(session, doc, 1, "run-2", job_id)
        assert ledger.claim(session, doc, 1, "run-1", job_id)  # the worker died; the retry of run-1 resumes


def test_a_failed_document_can_be_claimed_again_and_counts_its_attempts(db_url: str) -> None:
    _, [doc], job_id = _seed(db_url, 1)
    with session_scope(db_url) as session:
        assert ledger.claim(session, doc, 1, "w", job_id)
        assert ledger.mark_failed(session, doc, 1, "w", "chunk 1: 500 from the provider")
        assert ledger.claim(session, doc, 1, "w", job_id)
        record = session.scalars(select(ExtractionRecord)).one()
        assert record.attempts == 2 and record.last_error == "chunk 1: 500 from the provider"


def test_an_expired_lease_lets_another_worker_take_over(db_url: str) -> None:
    _, [doc], job_id = _seed(db_url, 1)
    with session_scope(db_url) as session:
        assert ledger.claim(session, doc, 1, "dead-worker", job_id, lease=timedelta(seconds=-1))
        assert ledger.claim(session, doc, 1, "live-worker", job_id)
        assert not ledger.mark_succeeded(session, doc, 1, "dead-worker", ledger.Outcome())


def test_outdated_documents_are_those_without_a_success_at_the_current_version(db_url: str) -> None:
    kb_id, docs, job_id = _seed(db_url, 3)
    with session_scope(db_url) as session:
        for doc in docs[:2]:
            ledger.claim(session, doc, 1, "w", job_id)
            ledger.mark_succeeded(session, doc, 1, "w", ledger.Outcome())
        kb = session.get_one(KnowledgeBase, kb_id)
        assert ledger.outdated_document_ids(session, kb) == [docs[2]]
        kb.current_schema_version = 2
        session.flush()
        assert sorted(ledger.outdated_document_ids(session, kb)) == sorted(docs)
        counts = ledger.status_counts(session, job_id)
        assert counts[ExtractionStatus.SUCCEEDED] == 2 and counts[ExtractionStatus.PENDING] == 1


def _claim_each(url: str, doc_ids: list[str], job_id: str, worker: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    dispose_engines()
    claimed = []
    for doc in doc_ids:
        with session_scope(url) as session:
            if ledger.claim(session, doc, 1, worker, job_id):
                claimed.append(doc)
    queue.put((worker, claimed))


@pytest.mark.slow  # two processes racing for seconds: out of the fast step
def test_two_processes_claiming_concurrently_never_claim_the_same_document(pg_url: str) -> None:
    _, doc_ids, job_id = _seed(pg_url, 400)
    dispose_engines()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    # Four workers race for every single document, two in each order.
    processes = [
        context.Process(target=_claim_each, args=(pg_url, doc_ids, job_id, "each-a", queue)),
        context.Process(target=_claim_each, args=(pg_url, list(reversed(doc_ids)), job_id, "each-b", queue)),
        context.Process(target=_claim_each, args=(pg_url, doc_ids, job_id, "each-c", queue)),
        context.Process(target=_claim_each, args=(pg_url, list(reversed(doc_ids)), job_id, "each-d", queue)),
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    all_claims = [doc for claimed in results.values() for doc in claimed]
    assert len(all_claims) == len(set(all_claims)), "a document was claimed twice"
    assert set(all_claims) == set(doc_ids)
    with session_scope(pg_url) as session:
        owners = dict(session.execute(select(ExtractionRecord.document_id, ExtractionRecord.claimed_by)).tuples().all())
    for worker, claimed in results.items():
        assert all(owners[doc] == worker for doc in claimed)


def test_the_reaper_fails_rows_whose_claimant_is_gone_and_keeps_live_ones(db_url: str) -> None:
    _, [dead, alive, unknown_expired, unknown_leased], job_id = _seed(db_url, 4)
    with session_scope(db_url) as session:
        assert ledger.claim(session, dead, 1, "dagster-run:dead", job_id)
        assert ledger.claim(session, alive, 1, "dagster-run:alive", job_id)
        assert ledger.claim(session, unknown_expired, 1, "cli", job_id, lease=timedelta(seconds=-1))
        assert ledger.claim(session, unknown_leased, 1, "cli-2", job_id)

        reaped = ledger.reap_abandoned(
            session, {"dagster-run:dead": True, "dagster-run:alive": False}.get
        )

        assert sorted(r.document_id for r in reaped) == sorted([dead, unknown_expired])
        rows = {r.document_id: r for r in session.scalars(select(ExtractionRecord))}
        assert rows[dead].status == ExtractionStatus.FAILED and "abandoned" in (rows[dead].last_error or "")
        assert rows[unknown_expired].status == ExtractionStatus.FAILED
        assert rows[alive].status == rows[unknown_leased].status == ExtractionStatus.RUNNING


def test_renewing_extends_only_the_claimants_own_leases(db_url: str) -> None:
    _, [mine, theirs], job_id = _seed(db_url, 2)
    with session_scope(db_url) as session:
        assert ledger.claim(session, mine, 1, "a", job_id, lease=timedelta(seconds=-1))
        assert ledger.claim(session, theirs, 1, "b", job_id, lease=timedelta(seconds=-1))
        assert ledger.renew(session, [mine, theirs], 1, "a") == {mine}
        assert not ledger.claim(session, mine, 1, "c", job_id)  # renewed: no longer expired
        assert ledger.claim(session, theirs, 1, "c", job_id)  # expired: taken over
        assert ledger.renew(session, [theirs], 1, "b") == set()  # b lost it
