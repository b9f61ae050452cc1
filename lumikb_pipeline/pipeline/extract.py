"""Stage 1 of extraction (the `extract_document_entities` op, and the demo in-process): claim each
document's ledger row and send its chunks to the LLM, rate-limited and checkpointed: every validated
chunk result is stored as a chunk checkpoint as soon as it exists. The checkpoint table is the
hand-over to stage 2 (`pipeline.write`), so nothing large passes between steps and a crash between
them costs no LLM call. One document's failure never fails the others.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.db import ledger
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure, ChunkInput
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.llm import checkpoints
from lumikb_pipeline.llm.checkpoints import CheckpointKey
from lumikb_pipeline.llm.extractor import ChunkExtractor, DeltaTask
from lumikb_pipeline.llm.prompt import derived_prompt_version
from lumikb_pipeline.pipeline.ahead import (
    ACTIVE_TTL_S,
    OwnExtraction,
    ahead_documents_key,
    ahead_lock_key,
    any_in_progress_ahead,
    free_previous_incarnation,
    in_progress_ahead,
    mark_in_progress,
    others_extracting,
    pick_ahead,
    release_ahead_lock,
    renew_ahead_lock,
    take_ahead_lock,
    unmark_in_progress,
    wait_for_ahead,
)
from lumikb_pipeline.pipeline.migration import SchemaHistory, StrategyOption, chunk_work, plan_documents
from lumikb_pipeline.pipeline.work import (
    DocumentOutcome,
    DocumentWork,
    LeaseKeeper,
    StopCheck,
    fail_held,
    group_by_schema,
    handed_back,
    job_takes_work,
    load_work,
    lost_claim,
    report_outcomes,
    stop_check,
)

log = logging.getLogger(__name__)

# Extraction ahead (`pipeline.ahead`) starts when this step's own batch has about this many seconds
# of calls left at the rate limit (answers not back yet, so about one LLM latency of it is in flight),
# so that the ahead calls follow the own ones without a pause: it first loads and plans its documents.
AHEAD_LEAD_S = 4.0
# Documents are taken ahead in groups of about this many seconds of calls at the limit.
AHEAD_GROUP_S = 30.0
# After its own batch, a step waits this long for the ahead lock: the step handing it over first lets
# its calls with reserved rate slots go out (up to `LUMIKB_LLM_MAX_IN_FLIGHT / R` s, 5 s by default).
AHEAD_GRACE_S = 6.0
AHEAD_POLL_S = 0.2
# How long a step extracting ahead that finds nothing left to take waits for another step's groups to
# give back the documents they had not started (they do when their calls in flight are answered).
AHEAD_RELEASE_WAIT_S = 10.0


def extract_documents(
    settings: Settings,
    extractor: ChunkExtractor,
    doc_ids: Sequence[str],
    *,
    claimant: str,
    job_id: str | None = None,
    schema_version: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    run_failed: Callable[[], bool] | None = None,
    lease: timedelta = ledger.DEFAULT_LEASE,
    strategy: StrategyOption = "auto",
    ahead_s: float = 0.0,
) -> list[DocumentOutcome]:
    """Stage 1: claim and extract. Documents already succeeded at this version and revision are
    `skipped` (a retried step does not redo them); claimed documents whose chunks all have a
    checkpoint now are `extracted` and stay claimed by `claimant` for stage 2. The claims' leases
    (`lease` long) are renewed while the extraction runs, and once more at its end; a document
    whose claim was lost meanwhile is `lost`. When `should_stop` stopped the step because its run
    failed (`run_failed`: its run process died), the documents not extracted are `handed_back`: left
    claimed and untouched for the run's retry, not cancelled.

    With `ahead_s` > 0 and a job, the step may then extract the job's later documents ahead, for at
    most `ahead_s` seconds, until another step of the job extracts its own batch (`pipeline.ahead`)."""
    started = time.monotonic()
    if job_id is not None and not job_takes_work(settings, job_id):
        # A late redelivery of a step of an ended job: claim, cancel and close nothing.
        ended = f"job {job_id} has ended; this step did nothing"
        return [
            DocumentOutcome(doc_id, "skipped", schema_version or 0, error=ended)
            for doc_id in doc_ids
        ]
    stop = stop_check(settings, job_id, should_stop, run_failed)
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
        ahead = None
        if job_id is not None and ahead_s > 0 and claimed:
            ahead = _Ahead(settings, extractor, job_id, claimant, claimed[0].schema_version, strategy, stop, ahead_s)
            ahead.free_previous_incarnation()
        with LeaseKeeper(settings, claimed, claimant, lease) as leases:
            if ahead is None:
                _extract_items(settings, extractor, claimed, strategy, stop, stop.on_result, results)
            else:
                lead = math.ceil(extractor.rate_limit.per_second * AHEAD_LEAD_S)

                # Registered from its first LLM call, not while it loads its documents and looks up
                # their checkpoints: the step extracting ahead goes on until then, so its reserved
                # calls and this step's first ones follow without a pause. Deregistered with about
                # `AHEAD_LEAD_S` of calls left: the next extraction ahead (this step's, or another's
                # that waits for it) then starts while its last calls are out, not after them.
                own = OwnExtraction(ahead.client, job_id, claimant, lazy=True)  # type: ignore[arg-type]

                # Documents another step is extracting ahead right now: this step's other documents
                # first, then those once their chunks are settled (checkpointed: no call paid twice).
                try:
                    busy = in_progress_ahead(ahead.client, ahead.job_id, [item.doc_id for item in claimed])
                except Exception:  # noqa: BLE001 - Redis away: nothing is known to be in progress
                    busy = set()
                # The calls this step makes itself: those of the busy documents are the other step's,
                # and the lead counts down to the end of this step's own (with many busy documents,
                # counting theirs too would hold the next extraction ahead back until after the wait
                # for them, and the calls would pause: 1.5 s at 10/s on a loaded machine).
                total = sum(len(item.chunks) for item in claimed if item.doc_id not in busy)

                def on_result(outcome: ChunkExtraction | ChunkFailure) -> None:
                    stop.on_result(outcome)
                    ahead.settled += 1
                    if total - ahead.settled <= lead:
                        own.finish()
                        ahead.start()

                try:
                    with own:
                        _extract_items(settings, extractor, [item for item in claimed if item.doc_id not in busy],
                                       strategy, stop, on_result, results, ahead, on_calls_start=own.start)
                        if busy:
                            wait_for_ahead(ahead.client, ahead.job_id, sorted(busy), stop)
                            _extract_items(settings, extractor, [item for item in claimed if item.doc_id in busy],
                                           strategy, stop, on_result, results, ahead, on_calls_start=own.start)
                except BaseException:
                    ahead.abort()
                    raise
                ahead.finish()
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
                if failures and all(f.reason == "cancelled" for f in failures) and stop.handing_back:
                    outcome.status, outcome.error = "handed_back", handed_back(item.doc_id, claimant)
                elif failures and all(f.reason == "cancelled" for f in failures):
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


def _extract_items(
    settings: Settings, extractor: ChunkExtractor, items: Sequence[DocumentWork], strategy: StrategyOption,
    stop: Callable[[], bool], on_result: Callable[[ChunkExtraction | ChunkFailure], None],
    results: dict[str, ChunkExtraction | ChunkFailure], ahead: _Ahead | None = None,
    wind_down: Callable[[], bool] | None = None, on_calls_start: Callable[[], None] | None = None,
) -> None:
    """Extract the chunks of `items` (each the cheapest correct way: `_migrate`) into `results`
    (`wind_down`, `on_calls_start`: see `ChunkExtractor.extract`)."""
    for (kb_id, version), group in group_by_schema(items).items():
        schema = group[0].schema
        migrated = len(results)
        full_chunks, deltas = _migrate(settings, extractor.model, kb_id, version, schema, group, strategy, results)
        if ahead is not None:
            ahead.settled += len(results) - migrated
        for result in extractor.extract_sync(kb_id, version, schema, full_chunks, stop, on_result,
                                             wind_down=wind_down, on_calls_start=on_calls_start):
            results[result.chunk_id] = result
        for task, delta_chunks in deltas:
            for result in extractor.extract_sync(kb_id, version, schema, delta_chunks, stop, on_result, task,
                                                 wind_down, on_calls_start):
                results[result.chunk_id] = result


class _Ahead:
    """A step's extraction ahead of its job (`pipeline.ahead`), in a thread of its own: it starts
    near the end of the step's own batch (`start`), waits for the job's ahead lock while another
    step extracts its own batch, then extracts the job's later documents until another step starts
    its own batch, the job stops, or `max_s` have passed. `finish` waits for it. The calls go
    through the same limiter and the job's stop conditions and spend (`stop`); their results are
    checkpoints only, and an error here never fails the step (the documents' own runs extract
    whatever is missing)."""

    def __init__(self, settings: Settings, extractor: ChunkExtractor, job_id: str, claimant: str, schema_version: int,
                 strategy: StrategyOption, stop: StopCheck, max_s: float) -> None:
        self.settings, self.extractor, self.job_id, self.claimant = settings, extractor, job_id, claimant
        self.schema_version, self.strategy, self.stop, self.max_s = schema_version, strategy, stop, max_s
        self.client = redis_client.connect(settings)
        self.settled = 0
        self.documents = 0
        self.calls = 0
        self._own_ended: float | None = None
        self._started = False
        self._lock = threading.Lock()
        self._in_progress: set[str] = set()  # documents of groups in progress, not yet settled
        self._handed_over = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"extract-ahead-{claimant[:24]}", daemon=True)

    def free_previous_incarnation(self) -> None:
        """This step may be starting again (`ahead.free_previous_incarnation`): what it held ahead in
        its previous process is freed now, not after 30 s, for the runs waiting for those documents
        (a `SIGKILL` of a child extracting ahead paused the job's calls for 29.5 s)."""
        try:
            freed = free_previous_incarnation(self.client, self.job_id, self.claimant)
        except Exception as exc:  # noqa: BLE001 - Redis away: the marks and the lock expire on their own
            log.warning("could not free what this step held ahead of job %s before: %s", self.job_id,
                        scrub(f"{type(exc).__name__}: {exc}"))
            return
        if freed:
            log.info("freed %d document(s) of job %s this step was extracting ahead when it stopped",
                     len(freed), self.job_id)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def finish(self) -> None:
        """The step's own batch is done: wait for the extraction ahead to end."""
        self._own_ended = time.monotonic()
        self.start()
        self._thread.join()
        if self.documents:
            log.info("extracted %d document(s) of job %s ahead with %d LLM calls", self.documents, self.job_id,
                     self.calls)

    def abort(self) -> None:
        """The step's own batch failed: stop the extraction ahead at once and wait for it."""
        self._handed_over.set()
        self._own_ended = time.monotonic() - AHEAD_GRACE_S
        if self._started:
            self._thread.join()

    def _run(self) -> None:
        asked = time.monotonic()
        try:
            while not self.stop() and not self._handed_over.is_set():
                others = others_extracting(self.client, self.job_id, self.claimant)
                if not others and take_ahead_lock(self.client, self.job_id, self.claimant):
                    log.info("extracting ahead of job %s: the ahead lock after %.1f s", self.job_id,
                             time.monotonic() - asked)
                    self._extract_ahead()
                    return
                if self._own_ended is not None and time.monotonic() - self._own_ended > AHEAD_GRACE_S:
                    holder = self.client.get(ahead_lock_key(self.job_id))
                    log.info("not extracting ahead of job %s: waited %.1f s (another step extracting its own "
                             "batch: %s; the ahead lock held by %s)", self.job_id, time.monotonic() - asked,
                             others, holder)
                    return
                time.sleep(AHEAD_POLL_S)
        except Exception as exc:  # noqa: BLE001 - ahead is an optimisation: the runs extract what is missing
            log.warning("extraction ahead of job %s stopped: %s", self.job_id, scrub(f"{type(exc).__name__}: {exc}"))
        finally:
            release_ahead_lock(self.client, self.job_id, self.claimant)

    def _extract_ahead(self) -> None:
        started = time.monotonic()
        done = threading.Event()
        # Held while this step picks groups. It goes when no further group will be picked, while the
        # groups' calls are still out: the watcher then stops renewing it (under this guard, so a
        # renewal never races the release and reads as a lost lock).
        holding = threading.Lock()
        picking = True

        def handed_over() -> bool:
            if time.monotonic() - started > self.max_s or others_extracting(self.client, self.job_id, self.claimant):
                return True
            with holding:
                if picking:
                    return not renew_ahead_lock(self.client, self.job_id, self.claimant)
            # Redis restarted without its data forgot the documents taken (the set), and another
            # step could take those of the groups still running.
            return not self.client.exists(ahead_documents_key(self.job_id))

        def watch() -> None:
            # The hand-over: another step extracts its own batch (or the time is up, or Redis lost
            # the lock and with it the marks of the documents taken). Watched until the last group
            # ends, not only while groups are picked: a group may hold many seconds of calls, and
            # handed over it starts no further chunk. Read here, so that the extractor's check
            # before every call only reads a flag. The documents' in-progress marks are renewed
            # here too.
            renewed = time.monotonic()
            while not done.wait(AHEAD_POLL_S):
                try:
                    if time.monotonic() - renewed > ACTIVE_TTL_S / 3:
                        renewed = time.monotonic()
                        self._renew_marks()
                    if handed_over():
                        self._handed_over.set()
                        return
                except Exception:  # noqa: BLE001 - a Redis hiccup: look again
                    continue

        watcher = threading.Thread(target=watch, name=f"ahead-watch-{self.claimant[:24]}", daemon=True)
        watcher.start()

        def should_stop() -> bool:
            return self._handed_over.is_set() or self.stop()

        # Handed over, it starts no further chunk, and the ones started make their calls: their rate
        # slots may be reserved, and a slot given up would be a pause in the next step's calls.
        # A stop of the job (cancel, budget, its run ending) stops every call at once.

        group_chunks = max(1, math.ceil(self.extractor.rate_limit.per_second * AHEAD_GROUP_S))
        lead = math.ceil(self.extractor.rate_limit.per_second * AHEAD_LEAD_S)
        groups: list[threading.Thread] = []
        try:
            while not should_stop():
                # Asked here too, not only by the watcher every AHEAD_POLL_S: Redis that lost the
                # lock lost the marks of the documents taken, and a group picked now would take
                # documents that are being extracted (paid twice).
                if not renew_ahead_lock(self.client, self.job_id, self.claimant):
                    return
                doc_ids = pick_ahead(
                    self.settings, self.client, self.job_id, self.claimant, self.schema_version, group_chunks
                )
                if not doc_ids:
                    # A step handed over gives the documents its groups had not started back only
                    # when their last calls are answered (seconds): until then they look taken, and
                    # ending here was a pause in the job's calls until the next run's step came
                    # (5-6 s at 10/s on a loaded machine). Wait for those groups, then pick again.
                    if self._wait_for_other_groups(should_stop):
                        continue
                    return
                # Each group in a thread of its own, the next one picked when this one has about
                # `AHEAD_LEAD_S` of calls left: a group's last calls are then not a pause.
                nearly_done = threading.Event()
                group = threading.Thread(target=self._extract_group, args=(doc_ids, lead, nearly_done),
                                         name=f"ahead-group-{self.claimant[:24]}", daemon=True)
                group.start()
                groups.append(group)
                while not nearly_done.wait(AHEAD_POLL_S) and not should_stop():
                    pass
        finally:
            # It picks no further group: the lock goes now, while the groups' last calls are still
            # out, so that the next step can start extracting ahead at once (its calls take the
            # slots after these at the limiter). Held until the last answer, it was a pause of
            # about one LLM latency in the job's calls at every hand-over.
            with holding:
                picking = False
                release_ahead_lock(self.client, self.job_id, self.claimant)
            for group in groups:
                group.join()
            done.set()
            watcher.join(timeout=5)

    def _wait_for_other_groups(self, should_stop: Callable[[], bool]) -> bool:
        """Wait (up to `AHEAD_RELEASE_WAIT_S`) until no other step's group extracts documents of the
        job ahead; True when some did and then ended (what they gave back can be picked), False at
        once when none does, or when the wait runs out."""
        started = time.monotonic()
        waited = False
        while True:
            with self._lock:
                mine = set(self._in_progress)
            if not any_in_progress_ahead(self.client, self.job_id, mine):
                break
            if time.monotonic() - started > AHEAD_RELEASE_WAIT_S or should_stop():
                return False
            time.sleep(AHEAD_POLL_S)
            waited = True
        if not waited:
            return False
        log.info("extracting ahead of job %s: waited %.1f s for another step's groups to give back the "
                 "documents they had not started", self.job_id, time.monotonic() - started)
        return True

    def _extract_group(self, doc_ids: list[str], lead: int, nearly_done: threading.Event) -> None:
        with self._lock:
            self._in_progress.update(doc_ids)
        try:
            work = load_work(self.settings, doc_ids, self.schema_version)
            # In partition order: a run waiting for one of these finds the earlier ones done first.
            items = [work[doc_id] for doc_id in reversed(doc_ids) if doc_id in work]
            total = sum(len(item.chunks) for item in items)
            settled = 0
            document_of = {chunk.id: item.doc_id for item in items for chunk in item.chunks}
            left = {item.doc_id: len(item.chunks) for item in items}

            def on_result(outcome: ChunkExtraction | ChunkFailure) -> None:
                nonlocal settled
                self.stop.on_result(outcome)
                settled += 1
                if total - settled <= lead:
                    nearly_done.set()
                doc_id = document_of.get(outcome.chunk_id)
                if doc_id is not None:
                    left[doc_id] -= 1
                    if not left[doc_id]:
                        self._settled(doc_id)

            results: dict[str, ChunkExtraction | ChunkFailure] = {}
            _extract_items(self.settings, self.extractor, items, self.strategy, self.stop, on_result, results,
                           wind_down=self._handed_over.is_set)
            untouched = [item.doc_id for item in items
                         if not any(isinstance(results.get(chunk.id), ChunkExtraction) for chunk in item.chunks)]
            if untouched:  # stopped before them: free for a later step to take ahead
                self.client.srem(ahead_documents_key(self.job_id), *untouched)
            self.documents += len(items) - len(untouched)
            self.calls += sum(result.llm_calls for result in results.values())
        except Exception as exc:  # noqa: BLE001 - ahead is an optimisation: the runs extract what is missing
            log.warning("extraction ahead of job %s stopped: %s", self.job_id, scrub(f"{type(exc).__name__}: {exc}"))
            self._handed_over.set()
        finally:
            for doc_id in doc_ids:
                self._settled(doc_id)
            nearly_done.set()

    def _settled(self, doc_id: str) -> None:
        """Every chunk of `doc_id` is settled (or its group ended): a run may extract it now."""
        with self._lock:
            if doc_id not in self._in_progress:
                return
            self._in_progress.discard(doc_id)
        try:
            unmark_in_progress(self.client, self.job_id, [doc_id])
        except Exception:  # noqa: BLE001 - Redis away: the mark expires on its own
            pass

    def _renew_marks(self) -> None:
        """Keep the in-progress marks of the documents being extracted from expiring."""
        with self._lock:
            doc_ids = sorted(self._in_progress)
        mark_in_progress(self.client, self.job_id, self.claimant, doc_ids)


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
