"""Stage 1 of extraction (the `extract_document_entities` op, and the demo in-process): claim each
document's ledger row and send its chunks to the LLM, rate-limited and checkpointed: every validated
chunk result is stored as a chunk checkpoint as soon as it exists. The checkpoint table is the
hand-over to stage 2 (`pipeline.write`), so nothing large passes between steps and a crash between
them costs no LLM call. One document's failure never fails the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure, ChunkInput
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm import checkpoints
from lumikb_pipeline.llm.checkpoints import CheckpointKey
from lumikb_pipeline.llm.extractor import ChunkExtractor, DeltaTask
from lumikb_pipeline.llm.prompt import derived_prompt_version
from lumikb_pipeline.pipeline.migration import SchemaHistory, StrategyOption, chunk_work, plan_documents
from lumikb_pipeline.pipeline.work import (
    DocumentOutcome,
    DocumentWork,
    LeaseKeeper,
    fail_held,
    group_by_schema,
    job_takes_work,
    load_work,
    lost_claim,
    report_outcomes,
    stop_check,
)


def extract_documents(
    settings: Settings,
    extractor: ChunkExtractor,
    doc_ids: Sequence[str],
    *,
    claimant: str,
    job_id: str | None = None,
    schema_version: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    lease: timedelta = ledger.DEFAULT_LEASE,
    strategy: StrategyOption = "auto",
) -> list[DocumentOutcome]:
    """Stage 1: claim and extract. Documents already succeeded at this version and revision are
    `skipped` (a retried step does not redo them); claimed documents whose chunks all have a
    checkpoint now are `extracted` and stay claimed by `claimant` for stage 2. The claims' leases
    (`lease` long) are renewed while the extraction runs, and once more at its end; a document
    whose claim was lost meanwhile is `lost`."""
    started = time.monotonic()
    if job_id is not None and not job_takes_work(settings, job_id):
        # A late redelivery of a step of an ended job: claim, cancel and close nothing.
        ended = f"job {job_id} has ended; this step did nothing"
        return [
            DocumentOutcome(doc_id, "skipped", schema_version or 0, error=ended)
            for doc_id in doc_ids
        ]
    stop = stop_check(settings, job_id, should_stop)
    work = load_work(settings, doc_ids, schema_version)
    outcomes: dict[str, DocumentOutcome] = {}
    claimed: list[DocumentWork] = []
    with session_scope(settings.effective_database_url) as session:
        for doc_id in doc_ids:
            item = work.get(doc_id)
            if item is None:
                outcomes[doc_id] = DocumentOutcome(
                    doc_id, "failed", schema_version or 0, error=f"document {doc_id} does not exist"
                )
                continue
            ledger.ensure_records(session, item.kb_id, [doc_id], item.schema_version, job_id)
            given_up = ledger.give_up_if_dying(session, doc_id, item.schema_version, claimant)
            if given_up is not None:
                outcomes[doc_id] = DocumentOutcome(doc_id, "failed", item.schema_version, error=given_up)
            elif ledger.claim(session, doc_id, item.schema_version, claimant, job_id, lease):
                claimed.append(item)
            else:
                outcomes[doc_id] = DocumentOutcome(doc_id, "skipped", item.schema_version)

    try:
        results: dict[str, ChunkExtraction | ChunkFailure] = {}
        with LeaseKeeper(settings, claimed, claimant, lease) as leases:
            for (kb_id, version), group in group_by_schema(claimed).items():
                schema = group[0].schema
                full_chunks, deltas = _migrate(
                    settings, extractor.model, kb_id, version, schema, group, strategy, results
                )
                for result in extractor.extract_sync(kb_id, version, schema, full_chunks, stop, stop.on_result):
                    results[result.chunk_id] = result
                for task, delta_chunks in deltas:
                    for result in extractor.extract_sync(
                        kb_id, version, schema, delta_chunks, stop, stop.on_result, task
                    ):
                        results[result.chunk_id] = result
        lost = leases.renew() if claimed else set()  # a full lease for the hand-over to stage 2

        elapsed = time.monotonic() - started
        with session_scope(settings.effective_database_url) as session:
            for item in claimed:
                outcome = DocumentOutcome(
                    item.doc_id, "extracted", item.schema_version, chunks=len(item.chunks), strategy=item.strategy
                )
                if item.doc_id in lost:
                    outcome.status, outcome.error = "lost", lost_claim(item.doc_id, claimant)
                    outcomes[item.doc_id] = outcome
                    continue
                failures: list[ChunkFailure] = []
                for chunk in item.chunks:
                    result = results[chunk.id]
                    outcome.llm_calls += result.llm_calls
                    if isinstance(result, ChunkFailure):
                        failures.append(result)
                        continue
                    outcome.cached_chunks += int(result.from_checkpoint)
                    outcome.prompt_tokens += result.prompt_tokens
                    outcome.completion_tokens += result.completion_tokens
                    outcome.cost_usd += result.cost_usd
                outcome.duration_s = elapsed
                if failures and all(f.reason == "cancelled" for f in failures):
                    outcome.status = "cancelled"
                    outcome.error = f"{stop.describe()} before every chunk was extracted; the graph was not changed"
                    if not ledger.mark_cancelled(session, item.doc_id, item.schema_version, claimant, outcome.error):
                        outcome.status, outcome.error = "lost", lost_claim(item.doc_id, claimant)
                elif failures:
                    first = failures[0]
                    outcome.status = "failed"
                    outcome.error = scrub(
                        f"{len(failures)} of {len(item.chunks)} chunks failed; chunk {first.chunk_id}: {first.reason}"
                    )
                    if not ledger.mark_failed(session, item.doc_id, item.schema_version, claimant, outcome.error,
                                              outcome.ledger_outcome()):
                        outcome.status, outcome.error = "lost", lost_claim(item.doc_id, claimant)
                outcomes[item.doc_id] = outcome
    except Exception as exc:
        fail_held(settings, claimed, claimant, job_id, exc)
        raise
    report_outcomes(settings, job_id, [outcomes[doc_id] for doc_id in doc_ids])
    return [outcomes[doc_id] for doc_id in doc_ids]


def _migrate(
    settings: Settings, model: str, kb_id: int, version: int, schema: DomainSchema, group: Sequence[DocumentWork],
    strategy: StrategyOption, results: dict[str, ChunkExtraction | ChunkFailure],
) -> tuple[list[ChunkInput], list[tuple[DeltaTask, list[ChunkInput]]]]:
    """Plan each document of `group` (`pipeline.migration`) and do what needs no LLM: migrated chunks
    of `graph-only` documents are stored as derived checkpoints and put in `results`. Returns the
    chunks to extract in full and, per delta, the chunks to ask it for."""
    full_chunks: list[ChunkInput] = []
    deltas: dict[int, tuple[DeltaTask, list[ChunkInput]]] = {}
    derived = CheckpointKey(kb_id, version, derived_prompt_version(schema), model)
    with session_scope(settings.effective_database_url) as session:
        history = SchemaHistory(session, kb_id)
        plans = plan_documents(session, kb_id, version, [item.doc_id for item in group], strategy, history)
        for item in group:
            plan = plans[item.doc_id]
            item.strategy = plan.strategy
            if plan.strategy == "full":
                full_chunks.extend(item.chunks)
                continue
            work = chunk_work(session, kb_id, plan, model, item.chunks, history)
            request = plan.delta
            for chunk in item.chunks:
                migrated = work.migrated.get(chunk.content_hash)
                if migrated is None:
                    full_chunks.append(chunk)  # no previous extraction of this text: extracted in full
                elif request is not None:
                    assert plan.from_version is not None
                    task, chunks = deltas.setdefault(plan.from_version, (DeltaTask(request, {}), []))
                    assert isinstance(task.bases, dict)
                    task.bases[chunk.content_hash] = migrated
                    chunks.append(chunk)
                else:
                    checkpoints.save(session, derived, chunk.content_hash, migrated)
                    results[chunk.id] = migrated.model_copy(update={"chunk_id": chunk.id, "from_checkpoint": True})
    return full_chunks, list(deltas.values())
