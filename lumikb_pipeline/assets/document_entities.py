"""`document_entities`: one partition per document = its entities and relationships in the graph.

A graph-backed asset of two ops, so each holds its own pool: `extract_document_entities` (pool
`lumikb_llm`) claims the run's documents in the ledger and extracts their chunks (checkpointed),
then `write_document_entities` (pool `lumikb_graph_write`) writes each document's graph and closes
its ledger row. Only the small outcome list passes between them; the chunk checkpoints are the
hand-over.

One run covers a range of partitions (a batch). Each document's outcome is its own:
- a written document is materialized on its own, with its metadata;
- a failed one gets an observation with its error, and the step that failed on it fails *after*
  handing over the others, so the run fails and the document's partition shows failed;
- a retry from failure re-runs extract and write; the ledger claim skips documents already done
  (the claimant is the root run, the same across retries), so only the failed ones are redone.
"""


import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    BackfillPolicy,
    DagsterRunStatus,
    Failure,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    graph_asset,
    op,
)

from lumikb_pipeline.assets.partitions import documents_partitions
from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.core.errors import UsageError
from lumikb_pipeline.core.names import (
    CLAIMANT_PREFIX,
    POOL_GRAPH_WRITE,
    POOL_LLM,
    TAG_BACKFILL,
    TAG_JOB_ID,
    TAG_MODE,
    TAG_SCHEMA_VERSION,
    TAG_STRATEGY,
)
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.pipeline.migration import StrategyOption
from lumikb_pipeline.pipeline.work import DocumentOutcome
from lumikb_pipeline.resources import DatabaseResource, GraphStoreResource, LLMResource, ReextractionResource

DOCUMENT_ENTITIES = AssetKey("document_entities")

# Infrastructure hiccups (a dropped connection) get a quick op-level retry; a document's own
# failure does not (it is raised with allow_retries=False and left to the run retry).
INFRA_RETRY = RetryPolicy(max_retries=2, delay=5)


@dataclass(frozen=True)
class RunScope:
    """What a run of `document_entities` works on, read from its partitions and tags."""

    doc_ids: tuple[str, ...]
    claimant: str
    jobs: Mapping[str, str]  # document id -> the job it belongs to (documents of no job are absent)
    schema_version: int | None
    mode: WriteMode
    strategy: StrategyOption = "auto"
    partitions: Mapping[str, str] = field(default_factory=dict)  # document id -> its partition key

    @classmethod
    def of(cls, context: OpExecutionContext, reextraction: ReextractionResource) -> "RunScope":
        """The run's scope. A run of a lumikb job carries the job's id in its tags; a run of a backfill
        launched in the Dagster UI belongs to that backfill's jobs, recorded here if the job-status
        sensor has not done it yet (`ui_backfill_jobs`)."""
        tags = context.run.tags
        version = tags.get(TAG_SCHEMA_VERSION)
        try:
            mode = WriteMode.parse(tags.get(TAG_MODE, WriteMode.REPLACE), f"run tag {TAG_MODE}")
        except UsageError as exc:
            raise Failure(str(exc), allow_retries=False) from None
        # The run's partitions are documents' partition keys; a key of no document (a partition still
        # keyed by document id, from before readable keys) is taken as the document id it is.
        keys = tuple(context.partition_keys)
        documents = reextraction.documents_of_partitions(keys)
        doc_ids = tuple(documents.get(key, key) for key in keys)
        if tags.get(TAG_JOB_ID):
            jobs = dict.fromkeys(doc_ids, tags[TAG_JOB_ID])
        elif tags.get(TAG_BACKFILL):
            jobs = reextraction.ui_backfill_jobs(context.instance, tags[TAG_BACKFILL], doc_ids)
        else:
            jobs = {}
        return cls(
            doc_ids=doc_ids,
            # Stable across retries of the same run, so a retried step can take over its own claims.
            claimant=f"{CLAIMANT_PREFIX}{context.run.root_run_id or context.run_id}",
            jobs=jobs,
            schema_version=int(version) if version else None,
            mode=mode,
            strategy="full" if tags.get(TAG_STRATEGY) == "full" else "auto",
            partitions={doc_id: key for key, doc_id in zip(keys, doc_ids, strict=True)},
        )

    def partition(self, doc_id: str) -> str:
        """The partition key of one of the run's documents."""
        return self.partitions.get(doc_id, doc_id)

    def by_job(self) -> dict[str | None, list[str]]:
        """The run's documents grouped by their job (None: no job), in run order."""
        groups: dict[str | None, list[str]] = {}
        for doc_id in self.doc_ids:
            groups.setdefault(self.jobs.get(doc_id), []).append(doc_id)
        return groups


class RunEndWatch:
    """A stop flag for a step: it turns on once the step's run is being cancelled or has ended.

    dagster-celery answers a run's cancel (UI "Terminate", a cancelled backfill) by revoking its
    Celery tasks, which does not stop a step already running; the run then ends, and run monitoring
    gives its pool slots to other steps 30 s later (`free_slots_after_run_end_seconds`). A step
    that went on would run beside the steps that took its slot, above the pool limit, and spend LLM
    calls nobody wants. With this flag the step starts no more LLM calls and writes no more
    documents (they end `cancelled`, as with `lumikb cancel`). A thread reads the run's status
    every `interval_s`: the extractor asks the flag before every call, on its event loop.

    A run that *failed* under a running step did not choose to stop: its process died (the run
    watchdog failed it) and the run's retry, with the same claimant, takes its documents over. Then
    `failed()` is true: the step leaves its documents claimed and untouched (`handed_back`) and
    fails (`_hand_back`), so the retry from failure runs it again; marking them `cancelled` would
    end the job `cancelled` with its documents undone.
    """

    STOPPING = (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED, DagsterRunStatus.FAILURE,
                DagsterRunStatus.SUCCESS)

    def __init__(self, context: OpExecutionContext, interval_s: float = 1.0) -> None:
        self._instance = context.instance
        self._run_id = context.run_id
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._failed = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"run-end-watch-{self._run_id[:8]}", daemon=True)

    def __enter__(self) -> "RunEndWatch":
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closed.set()
        self._thread.join(timeout=5)

    def __call__(self) -> bool:
        return self._stop.is_set()

    def failed(self) -> bool:
        """The run ended under the step without being cancelled (its process died)."""
        return self._failed.is_set()

    def _poll(self) -> None:
        while not self._closed.wait(self._interval_s):
            try:
                run = self._instance.get_run_by_id(self._run_id)
            except Exception:  # noqa: BLE001 - a storage hiccup: look again next time
                continue
            if run is None or run.status in self.STOPPING:
                if run is not None and run.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS):
                    self._failed.set()
                self._stop.set()
                return


def _failures(outcomes: Sequence[DocumentOutcome]) -> list[DocumentOutcome]:
    return [o for o in outcomes if o.status == "failed"]


def _hand_back(context: OpExecutionContext, stage: str, outcomes: Sequence[DocumentOutcome]) -> None:
    """Fail the step when its run failed under it and it left documents to the run's retry: a
    step that succeeded would not run again in the retry from failure, and they would stay undone."""
    left = [o.doc_id for o in outcomes if o.status == "handed_back"]
    if left:
        raise Failure(
            description=(
                f"the run failed while this step ran ({stage}; its run process is gone): it stopped and left "
                f"{len(left)} document(s) claimed for the run's retry, which does them"
            ),
            allow_retries=False,
        )


def _report_failures(
    context: OpExecutionContext, stage: str, failed: Sequence[DocumentOutcome], scope: RunScope
) -> Iterator[object]:
    """One observation per failed document (its error on its partition), then the step's failure."""
    for outcome in failed:
        yield AssetObservation(
            asset_key=DOCUMENT_ENTITIES,
            partition=scope.partition(outcome.doc_id),
            metadata={
                "status": "failed",
                "stage": stage,
                "error": MetadataValue.text(outcome.error or "unknown error"),
                "schema_version": outcome.schema_version,
                "run_id": context.run_id,
            },
        )
    lines = [f"- {scope.partition(o.doc_id)} (document {o.doc_id}): {o.error}" for o in failed[:20]]
    more = f"\n... and {len(failed) - 20} more" if len(failed) > 20 else ""
    raise Failure(
        description=(
            f"{len(failed)} document(s) failed in {stage}; the others of this batch were handed on. "
            "A retry from failure redoes only these.\n" + "\n".join(lines) + more
        ),
        metadata={"failed_documents": MetadataValue.json({scope.partition(o.doc_id): o.error for o in failed})},
        allow_retries=False,
    )


@op(
    pool=POOL_LLM,
    retry_policy=INFRA_RETRY,
    description="Claim the run's documents in the ledger and extract their chunks with the LLM (checkpointed).",
)
def extract_document_entities(
    context: OpExecutionContext, llm: LLMResource, reextraction: ReextractionResource
) -> Iterator[object]:
    scope = RunScope.of(context, reextraction)
    started = time.monotonic()
    # The job's stop conditions (cancel, budget) are checked by the processing code from `job_id`;
    # the run's own end (a cancelled run) by the watch. A run's documents normally share one job (a
    # UI backfill over several KBs has one job per KB).
    # Extraction ahead (`pipeline.ahead`) keeps the limit busy while the job's next run starts; it
    # needs runs that overlap, which only the Celery executor gives (the in-process runner runs
    # its batches one after the other, where a step extracting ahead would only delay its own).
    ahead = context.job_def.executor_def.name.startswith("celery")
    outcomes: list[DocumentOutcome] = []
    with RunEndWatch(context) as run_ended:
        for job_id, doc_ids in scope.by_job().items():
            outcomes += llm.extract_documents(
                doc_ids, claimant=scope.claimant, job_id=job_id, schema_version=scope.schema_version,
                should_stop=run_ended, run_failed=run_ended.failed, strategy=scope.strategy, ahead=ahead,
            )
    counts = {status: sum(1 for o in outcomes if o.status == status) for status in {o.status for o in outcomes}}
    context.log.info(
        f"extracted {len(scope.doc_ids)} document(s) in {time.monotonic() - started:.1f}s: {counts}"
        + (" (skipped ones were already extracted at this version and revision)" if counts.get("skipped") else "")
    )
    # Hand the outcomes on first: the write op runs on them even if this step then fails.
    yield Output(outcomes)
    _hand_back(context, "extraction", outcomes)
    failed = _failures(outcomes)
    if failed:
        yield from _report_failures(context, "extraction", failed, scope)


def _writable(
    database: DatabaseResource, outcomes: Sequence[DocumentOutcome], claimant: str, jobs: Mapping[str, str]
) -> list[DocumentOutcome]:
    """The extracted outcomes this step may write: their ledger row is held by this run's claimant,
    or can be taken back (a retry of this step alone after its first attempt failed on them).
    Rows that succeeded meanwhile are left alone."""
    from lumikb_pipeline.db import ledger
    from lumikb_pipeline.db.models import ExtractionStatus

    extracted = [o for o in outcomes if o.status == "extracted"]
    if not extracted:
        return []
    ready: list[DocumentOutcome] = []
    with database.session() as session:
        by_version: dict[int, list[DocumentOutcome]] = {}
        for outcome in extracted:
            by_version.setdefault(outcome.schema_version, []).append(outcome)
        for version, group in by_version.items():
            rows = ledger.records_for(session, [o.doc_id for o in group], version)
            for outcome in group:
                row = rows.get(outcome.doc_id)
                if row is None:
                    continue
                held = row.status == ExtractionStatus.RUNNING and row.claimed_by == claimant
                if held or ledger.claim(session, outcome.doc_id, version, claimant, jobs.get(outcome.doc_id)):
                    ready.append(outcome)
    return ready


def _document_labels(database: DatabaseResource, doc_ids: Sequence[str]) -> dict[str, dict[str, object]]:
    """Each document's `kb`, `title`, `source` and `document_id`, for its materializations (one query per
    run step)."""
    from sqlalchemy import select

    from lumikb_pipeline.db.models import Document, KnowledgeBase

    if not doc_ids:
        return {}
    with database.session() as session:
        rows = session.execute(
            select(Document.id, KnowledgeBase.slug, Document.title, Document.source)
            .join(KnowledgeBase, KnowledgeBase.id == Document.kb_id)
            .where(Document.id.in_(list(doc_ids)))
        ).tuples()
        return {doc_id: {"kb": kb, "title": title, "source": source, "document_id": doc_id}
                for doc_id, kb, title, source in rows}


class JobProgressMetadata:
    """The job progress in a write step's materializations, read at most once every `max_age_s` per
    job. A read costs up to 13 ms once a job has 5,000 finishes (its latest finish times, for the
    rate: `tracking.progress.job_metadata`), about as much as writing a document's graph; between
    reads the ETA counts down with the clock and `job_documents_done` may lag by up to `max_age_s`."""

    def __init__(self, reextraction: ReextractionResource, max_age_s: float = 1.0) -> None:
        self._reextraction = reextraction
        self._max_age_s = max_age_s
        self._read: dict[str, tuple[float, dict[str, object]]] = {}

    def __call__(self, job_id: str) -> dict[str, object]:
        now = time.monotonic()
        read_at, metadata = self._read.get(job_id, (float("-inf"), {}))
        if now - read_at >= self._max_age_s:
            read_at, metadata = self._read[job_id] = (now, self._reextraction.job_metadata(job_id))
        eta = metadata.get("job_eta_seconds")
        if isinstance(eta, int | float):
            return {**metadata, "job_eta_seconds": round(max(0.0, eta - (now - read_at)), 1)}
        return metadata


def _materialization(
    progress: JobProgressMetadata, outcome: DocumentOutcome, scope: RunScope, labels: dict[str, object]
) -> AssetMaterialization:
    metadata: dict[str, object] = {
        **labels,
        "schema_version": outcome.schema_version,
        "entities": outcome.entities,
        "relationships": outcome.relationships,
        "llm_calls": outcome.llm_calls,
        "cached_chunks": outcome.cached_chunks,
        "chunks": outcome.chunks,
        "duration_s": round(outcome.duration_s, 3),
        "cost_usd": round(outcome.cost_usd, 6),
        "mode": scope.mode.value,
        "strategy": outcome.strategy,
        "reused": False,
    }
    if job_id := scope.jobs.get(outcome.doc_id):
        metadata["job_id"] = job_id
        # The job's progress as of this document (null rate and ETA while there is no pace yet).
        metadata.update({key: value for key, value in progress(job_id).items() if value is not None})
    return AssetMaterialization(
        asset_key=DOCUMENT_ENTITIES, partition=scope.partition(outcome.doc_id), metadata=metadata  # type: ignore[arg-type]
    )


def _already_current(
    database: DatabaseResource, outcomes: Sequence[DocumentOutcome], scope: RunScope,
    labels: dict[str, dict[str, object]],
) -> list[AssetMaterialization]:
    """Materializations for the skipped documents that are already extracted at this version and
    revision (done by an earlier attempt of this run, or before it): the partition is current, so
    it says so, with `reused: true` and the numbers of the extraction that made it. Nothing is
    redone. (A retried run plans its whole range again; without this the documents done by the
    first attempt would show failed when the retry fails on another one.)"""
    from lumikb_pipeline.db import ledger
    from lumikb_pipeline.db.models import ExtractionStatus

    skipped: dict[int, list[str]] = {}
    for outcome in outcomes:
        if outcome.status == "skipped":
            skipped.setdefault(outcome.schema_version, []).append(outcome.doc_id)
    events = []
    with database.session() as session:
        for version, doc_ids in skipped.items():
            for doc_id, row in ledger.records_for(session, doc_ids, version).items():
                if row.status != ExtractionStatus.SUCCEEDED:
                    continue  # someone else is on it: not this run's to report
                metadata: dict[str, object] = {
                    **labels.get(doc_id, {}),
                    "schema_version": version,
                    "entities": row.entity_count,
                    "relationships": row.relationship_count,
                    "llm_calls": 0,
                    "cached_chunks": row.cached_chunks,
                    "reused": True,
                    "mode": scope.mode.value,
                }
                if row.job_id:
                    metadata["job_id"] = row.job_id
                events.append(
                    AssetMaterialization(
                        asset_key=DOCUMENT_ENTITIES, partition=scope.partition(doc_id), metadata=metadata  # type: ignore[arg-type]
                    )
                )
    return events


@op(
    pool=POOL_GRAPH_WRITE,
    retry_policy=INFRA_RETRY,
    out=Out(Nothing, is_required=False),
    description="Write each extracted document's graph (one transaction per document) and close its ledger row.",
)
def write_document_entities(
    context: OpExecutionContext,
    outcomes: list[DocumentOutcome],
    database: DatabaseResource,
    graph_store: GraphStoreResource,
    reextraction: ReextractionResource,
) -> Iterator[object]:
    scope = RunScope.of(context, reextraction)
    labels = _document_labels(database, [o.doc_id for o in outcomes if o.status in ("skipped", "extracted")])
    current = _already_current(database, outcomes, scope, labels)
    yield from current
    ready = _writable(database, outcomes, scope.claimant, scope.jobs)
    if not ready:
        context.log.info(
            f"nothing to write: {len(current)} document(s) already current, none extracted by this run"
        )
        return
    results: list[DocumentOutcome] = []
    progress = JobProgressMetadata(reextraction)
    with graph_store.open() as store, RunEndWatch(context) as run_ended:
        # One document at a time, so each materialization is recorded as soon as it is true.
        # (Not the op's output: that would materialize every partition of the run, failed ones too.)
        for outcome in ready:
            (result,) = graph_store.write_documents(
                store, [outcome], claimant=scope.claimant, job_id=scope.jobs.get(outcome.doc_id), mode=scope.mode,
                should_stop=run_ended, run_failed=run_ended.failed,
            )
            results.append(result)
            if result.status == "succeeded":
                yield _materialization(progress, result, scope, labels.get(result.doc_id, {}))
    written = sum(1 for o in results if o.status == "succeeded")
    context.log.info(f"wrote {written} of {len(ready)} document(s) ({scope.mode}); {len(current)} already current")
    _hand_back(context, "graph write", results)
    failed = _failures(results)
    if failed:
        yield from _report_failures(context, "graph write", failed, scope)


@graph_asset(
    partitions_def=documents_partitions,
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=get_settings().reextract_batch_size),
    group_name="extraction",
    description=(
        "One partition per document: its entities and relationships in the graph at a schema version, "
        "materialized per document (a failed one shows failed with its error)."
    ),
)
def document_entities() -> object:
    return write_document_entities(extract_document_entities())
