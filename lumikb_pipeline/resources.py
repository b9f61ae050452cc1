"""Dagster resources: clients that do the pipeline's I/O, configured from the environment.

As in Dagster's own example projects, an op or a sensor receives something that does I/O (a session,
a graph store, `extract_documents`, `start`), never settings to build its own connections from. Each
field overrides one setting for its resource (empty: the environment decides), so the same
definitions serve every environment and the choice is made in one place, the environment.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis
from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext
from sqlalchemy.orm import Session

from lumikb_pipeline.core.config import Settings, get_settings
from lumikb_pipeline.db import step_outputs
from lumikb_pipeline.db.migrate import require_database
from lumikb_pipeline.db.partition_keys import documents_of_partitions
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.db.step_outputs import StepOutputKey
from lumikb_pipeline.domain.modes import WriteMode
from lumikb_pipeline.graph import open_graph_store
from lumikb_pipeline.graph.store import GraphStore
from lumikb_pipeline.infra.redis_client import connect
from lumikb_pipeline.infra.run_retention import RETENTION_S, expired_step_output_runs
from lumikb_pipeline.pipeline.migration import StrategyOption
from lumikb_pipeline.pipeline.work import DocumentOutcome
from lumikb_pipeline.pipeline.write import write_documents
from lumikb_pipeline.reextraction import backfills, reaper, service, status
from lumikb_pipeline.reextraction.drift import KbDrift, drift_report
from lumikb_pipeline.tracking.progress import job_metadata

if TYPE_CHECKING:
    from dagster import DagsterInstance
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

    from lumikb_pipeline.db.models import Job
    from lumikb_pipeline.llm.extractor import ChunkExtractor


def _settings(**overrides: str | None) -> Settings:
    """The environment's settings with a resource's non-empty overrides applied."""
    settings = get_settings()
    changes = {name: value for name, value in overrides.items() if value}
    return settings.model_copy(update=changes) if changes else settings


def _app_database(database_url: str | None) -> Settings:
    """`_settings` for a resource that works on the app database; refuses, with one message naming
    `LUMIKB_HOME`, a database that is missing or empty (none is created: `migrate.require_database`)."""
    settings = _settings(database_url=database_url)
    require_database(settings.effective_database_url, settings.home_dir)
    return settings


class DatabaseResource(ConfigurableResource):
    """The app database (KBs, documents, ledger, jobs, run-time settings)."""

    database_url: str | None = None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the app database."""
        return _app_database(self.database_url).effective_database_url

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with session_scope(self.url) as session:
            yield session

    def prune_step_outputs(self, instance: DagsterInstance) -> list[str]:
        """Delete the step outputs (`StepOutputIOManager`) of the runs the retention rule lets go
        (succeeded ones at once); one line when something was deleted."""
        with self.session() as session:
            stored = step_outputs.stored_runs(session)
            if not stored:
                return []
            expired = expired_step_output_runs(instance, stored)
            deleted = step_outputs.delete_runs(session, expired)
        return [f"deleted {deleted} step output(s) of {len(expired)} ended run(s)"] if deleted else []


class GraphStoreResource(ConfigurableResource):
    """The entity graph (Neo4j when `LUMIKB_NEO4J_URI` is set, else the embedded store), and the
    write stage that puts extracted documents into it."""

    neo4j_uri: str | None = None
    database_url: str | None = None

    @contextmanager
    def open(self) -> Iterator[GraphStore]:
        """An open graph store, closed on exit."""
        store = open_graph_store(_settings(neo4j_uri=self.neo4j_uri, database_url=self.database_url))
        try:
            yield store
        finally:
            store.close()

    def write_documents(
        self,
        store: GraphStore,
        extracted: Sequence[DocumentOutcome],
        *,
        claimant: str,
        job_id: str | None,
        mode: WriteMode,
        should_stop: Callable[[], bool] | None = None,
        run_failed: Callable[[], bool] | None = None,
    ) -> list[DocumentOutcome]:
        """Write each extracted document's graph into `store` and close its ledger row
        (`pipeline.write.write_documents`)."""
        return write_documents(
            _app_database(self.database_url), store, extracted, claimant=claimant, job_id=job_id,
            mode=mode, should_stop=should_stop, run_failed=run_failed,
        )


class LLMResource(ConfigurableResource):
    """Extraction with the configured model (`LUMIKB_LLM_MODEL`), behind the global rate limit and the
    chunk checkpoints. The model is deliberately not overridable here: the write stage finds the
    checkpoints by the configured model.

    The LLM modules are imported when a step first uses them, on the Celery worker that runs it (its
    start-up preloads them): they bring LiteLLM, about 3 s of imports that every run's own process
    and the code server would otherwise pay, only to load the definitions."""

    database_url: str | None = None

    def extractor(self) -> ChunkExtractor:
        """A `ChunkExtractor` on this resource's settings."""
        from lumikb_pipeline.llm.extractor import ChunkExtractor  # here, not above: see the class

        return ChunkExtractor(_app_database(self.database_url))

    def extract_documents(
        self,
        doc_ids: Sequence[str],
        *,
        claimant: str,
        job_id: str | None,
        schema_version: int | None,
        should_stop: Callable[[], bool] | None = None,
        run_failed: Callable[[], bool] | None = None,
        strategy: StrategyOption = "auto",
        ahead: bool = False,
    ) -> list[DocumentOutcome]:
        """Claim the documents in the ledger and extract their chunks (`pipeline.extract.extract_documents`);
        with `ahead`, then the job's later documents while its next run starts (`LUMIKB_REEXTRACT_AHEAD_S`)."""
        from lumikb_pipeline.llm.extractor import ChunkExtractor  # here, not above: see the class
        from lumikb_pipeline.pipeline.extract import extract_documents

        settings = _app_database(self.database_url)
        return extract_documents(
            settings, ChunkExtractor(settings), doc_ids, claimant=claimant, job_id=job_id,
            schema_version=schema_version, should_stop=should_stop, run_failed=run_failed, strategy=strategy,
            ahead_s=settings.reextract_ahead_s if ahead else 0.0,
        )


class RedisResource(ConfigurableResource):
    """The pipeline's Redis (progress, rate limiting, cancel flags)."""

    redis_url: str | None = None

    def client(self) -> redis.Redis:
        """A client with string responses."""
        return connect(_settings(redis_url=self.redis_url))


class ReextractionResource(ConfigurableResource):
    """The product's re-extraction jobs: starting them, the jobs of UI backfills, their status, and
    the drift report with its notification policy."""

    database_url: str | None = None

    def _app_settings(self) -> Settings:
        return _app_database(self.database_url)

    def start(
        self,
        kb_slug: str,
        selection: service.Selection,
        *,
        instance: DagsterInstance,
        asset_graph: BaseAssetGraph | None,
        **options: Any,
    ) -> Job:
        """Start a re-extraction job (`reextraction.service.start_reextraction`)."""
        return service.start_reextraction(
            self._app_settings(), kb_slug, selection, instance=instance, asset_graph=asset_graph, **options
        )

    def documents_of_partitions(self, partition_keys: Sequence[str]) -> dict[str, str]:
        """{partition key: document id} of these `documents` partitions (keys of no document left out)."""
        with session_scope(self._app_settings().effective_database_url) as session:
            return documents_of_partitions(session, partition_keys)

    def ui_backfill_jobs(self, instance: DagsterInstance, backfill_id: str, doc_ids: Sequence[str]) -> dict[str, str]:
        """{document id: job id} for documents of a backfill launched in the Dagster UI."""
        return backfills.ui_backfill_jobs(self._app_settings(), instance, backfill_id, doc_ids)

    def record_ui_backfills(self, instance: DagsterInstance) -> list[str]:
        """Record the jobs of UI backfills that have none yet; returns their backfill ids."""
        return backfills.record_ui_backfills(self._app_settings(), instance)

    def reap_abandoned_work(self, instance: DagsterInstance) -> list[str]:
        """Close the ledger rows of workers that died (`reextraction.reaper`); one line per job touched."""
        return reaper.reap_abandoned_work(self._app_settings(), instance)

    def refresh(self, job_id: str, instance: DagsterInstance, asset_graph: BaseAssetGraph | None) -> Job:
        """Bring a job's status in line with its backfill (`reextraction.status.refresh_job_status`)."""
        return status.refresh_job_status(self._app_settings(), job_id, instance, asset_graph)

    def job_metadata(self, job_id: str) -> dict[str, object]:
        """A job's progress as Dagster metadata (`tracking.progress.job_metadata`; empty when unreadable)."""
        return job_metadata(self._app_settings(), job_id)

    def drift_report(self) -> list[KbDrift]:
        """Outdated documents per KB."""
        with session_scope(self._app_settings().effective_database_url) as session:
            return drift_report(session)

    def drift_policy(self) -> tuple[int, str | None]:
        """When to notify about drift: the threshold of outdated documents and the webhook, if any."""
        settings = self._app_settings()
        return settings.drift_threshold, settings.drift_webhook_url


class StepOutputIOManager(ConfigurableIOManager):
    """Hands a run's step outputs to its next steps through the app database (`db.step_outputs`),
    so the steps of one run may run on different machines with no shared folder: a Celery worker
    needs the databases, Redis and the broker, nothing else.

    Outputs are pickled, as Dagster's filesystem IO manager does, and keyed by run, step, output and
    mapping key; a re-execution reads a skipped step's output from the run that made it (Dagster
    names that run in `upstream_output.run_id`). They are run-scoped hand-overs, not assets' values:
    `DatabaseResource.prune_step_outputs` deletes them once their run succeeded, or by the run
    retention rule.
    """

    database_url: str | None = None

    def _url(self) -> str:
        return _app_database(self.database_url).effective_database_url

    def handle_output(self, context: OutputContext, obj: object) -> None:
        key = _output_key(context)
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        with session_scope(self._url()) as session:
            size = step_outputs.save(session, key, payload)
        context.add_output_metadata({"stored_in": "app database (dagster_step_outputs)", "size_bytes": size})

    def load_input(self, context: InputContext) -> object:
        upstream = context.upstream_output
        if upstream is None:
            raise ValueError(f"input {context.name!r} has no upstream output to load; give it a value instead")
        key = _output_key(upstream)
        with session_scope(self._url()) as session:
            payload = step_outputs.load(session, key)
        if payload is None:
            raise FileNotFoundError(
                f"the {key.describe()} is not stored (any more): step outputs are deleted once their run "
                f"succeeded or {RETENTION_S / 3600:.0f} h after it ended. Re-execute the whole run, not from a step."
            )
        return pickle.loads(payload)  # noqa: S301 - written by this IO manager into the app database


def _output_key(context: OutputContext) -> StepOutputKey:
    if context.run_id is None or context.step_key is None:
        raise ValueError(f"output {context.name!r} has no run or step to store it under (not a run's step output)")
    return StepOutputKey(context.run_id, context.step_key, context.name or "result", context.mapping_key or "")


__all__ = [
    "DatabaseResource", "GraphStoreResource", "LLMResource", "RedisResource", "ReextractionResource",
    "StepOutputIOManager",
]
