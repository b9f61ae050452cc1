"""Stage 2 of extraction (the `write_document_entities` op): read each extracted document's chunk
checkpoints back, build its graph contribution, write it in one transaction, and close its ledger
row. A document is written whole or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.errors import LumikbError
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.domain.results import GraphChunk
from lumikb_pipeline.graph.build import build_document_graph
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline.llm.checkpoints import load_checkpoints
from lumikb_pipeline.llm.prompt import derived_prompt_version, effective_prompt_version
from lumikb_pipeline.pipeline.work import (
    DocumentOutcome,
    DocumentWork,
    fail_held,
    handed_back,
    load_work,
    lost_claim,
    report_outcomes,
    stop_check,
)


def write_documents(
    settings: Settings,
    graph_store: GraphStore,
    extracted: Sequence[DocumentOutcome],
    *,
    claimant: str,
    job_id: str | None = None,
    mode: WriteMode = WriteMode.REPLACE,
    should_stop: Callable[[], bool] | None = None,
    run_failed: Callable[[], bool] | None = None,
    lease: timedelta = ledger.DEFAULT_LEASE,
) -> list[DocumentOutcome]:
    """Stage 2: write the graph of each `extracted` document from its checkpoints and close its
    ledger row. Other outcomes pass through unchanged. A document is written whole or not at all:
    a cancel that arrives before its write keeps its previous graph and marks it `cancelled`; when
    the stop is the step's run failing (`run_failed`: its process died), the documents not written
    yet are `handed_back`, left claimed and untouched for the run's retry.

    The claim is renewed first, in the transaction that records the result (which holds the row
    until the result is recorded): a document whose claim was lost is not written (`lost`)."""
    stop = stop_check(settings, job_id, should_stop, run_failed)
    to_write = [o for o in extracted if o.status == "extracted"]
    work: dict[str, DocumentWork] = {}
    for version in {o.schema_version for o in to_write}:
        # Each document at the version stage 1 extracted it at (which may not be the KB's current one).
        work.update(load_work(settings, [o.doc_id for o in to_write if o.schema_version == version], version))
    results: list[DocumentOutcome] = []
    try:
        for outcome in extracted:
            if outcome.status != "extracted":
                results.append(outcome)
                continue
            started = time.monotonic()
            item = work[outcome.doc_id]
            with session_scope(settings.effective_database_url) as session:
                if not ledger.renew(session, [item.doc_id], item.schema_version, claimant, lease):
                    outcome.status, outcome.error = "lost", lost_claim(item.doc_id, claimant)
                    results.append(outcome)
                    continue
                if stop.handing_back:
                    outcome.status, outcome.error = "handed_back", handed_back(item.doc_id, claimant)
                    results.append(outcome)
                    continue
                if stop.cancelled:
                    outcome.status = "cancelled"
                    outcome.error = "the job was cancelled before the graph write; the previous graph is kept"
                    ledger.mark_cancelled(session, item.doc_id, item.schema_version, claimant, outcome.error)
                    results.append(outcome)
                    continue
                try:
                    extractions = load_checkpoints(
                        session, item.kb_id, item.schema_version,
                        effective_prompt_version(item.schema), settings.llm_model, item.chunks,
                    )
                    if len(extractions) < len(item.chunks):
                        # Chunks migrated from an earlier version (graph-only, delta) have a derived checkpoint.
                        done = {e.chunk_id for e in extractions}
                        extractions += load_checkpoints(
                            session, item.kb_id, item.schema_version, derived_prompt_version(item.schema),
                            settings.llm_model, [c for c in item.chunks if c.id not in done],
                        )
                    if len(extractions) != len(item.chunks):
                        raise LumikbError(
                            f"{len(item.chunks) - len(extractions)} of the document's chunks have no checkpoint at "
                            f"schema version {item.schema_version}; re-run the document to extract them"
                        )
                    graph = build_document_graph(
                        item.kb_slug, item.doc_id, item.schema_version,
                        [GraphChunk(id=c.id, ordinal=item.ordinals[c.id]) for c in item.chunks],
                        extractions,
                    )
                    summary = graph_store.write_document(graph, item.schema, mode)
                    if summary.refused:  # a newer extraction was written first: keep it, say so
                        outcome.status = "skipped"
                        outcome.error = (
                            f"not written: the graph already holds document {item.doc_id} at schema version "
                            f"{summary.newer_version_held}, newer than this extraction's {item.schema_version}"
                        )
                        ledger.mark_skipped(session, item.doc_id, item.schema_version, claimant, outcome.error)
                        results.append(outcome)
                        continue
                    outcome.entities, outcome.relationships = summary.entities, summary.relationships
                    outcome.status = "succeeded"
                    outcome.duration_s += time.monotonic() - started
                    if not ledger.mark_succeeded(session, item.doc_id, item.schema_version, claimant,
                                                 outcome.ledger_outcome()):
                        # Cannot happen: the renewal above holds the row until this transaction ends.
                        raise RuntimeError(
                            f"the ledger row of document {item.doc_id} at schema version {item.schema_version} "
                            f"changed while {claimant} held it"
                        )
                except LumikbError as exc:  # a schema violation or an invalid graph: this document only
                    outcome.status = "failed"
                    outcome.error = scrub(str(exc))
                    ledger.mark_failed(session, item.doc_id, item.schema_version, claimant, outcome.error,
                                       outcome.ledger_outcome())
            results.append(outcome)
    except Exception as exc:
        done = {o.doc_id for o in results}
        fail_held(settings, [work[o.doc_id] for o in to_write if o.doc_id not in done], claimant, job_id, exc)
        raise
    written = {o.doc_id for o in to_write}
    report_outcomes(settings, job_id, [o for o in results if o.doc_id in written])
    return results
