"""Dagster resources: thin, typed handles on the pipeline's own modules, configured from `Settings`.

Each field overrides one setting for the resource (empty: the environment decides), so the same
definitions serve every environment and the choice is made in one place, the environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import redis
from dagster import ConfigurableResource
from sqlalchemy.orm import Session

from lumikb_pipeline.config import Settings, get_settings
from lumikb_pipeline.db.session import session_scope

if TYPE_CHECKING:
    from lumikb_pipeline.graph.store import GraphStore
    from lumikb_pipeline.llm.extractor import ChunkExtractor


class DatabaseResource(ConfigurableResource):
    """The app database (KBs, documents, ledger, jobs, run-time settings)."""

    database_url: str | None = None

    def app_settings(self) -> Settings:
        """The pipeline's settings with this resource's overrides applied; raises a clear error
        naming `LUMIKB_HOME` when the app database is missing or empty (none is created here)."""
        from lumikb_pipeline.db.migrate import require_database

        settings = get_settings()
        if self.database_url:
            settings = settings.model_copy(update={"database_url": self.database_url})
        require_database(settings.effective_database_url, settings.home_dir)
        return settings

    @property
    def url(self) -> str:
        return self.app_settings().effective_database_url

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with session_scope(self.url) as session:
            yield session


class GraphStoreResource(ConfigurableResource):
    """The entity graph (Neo4j when `LUMIKB_NEO4J_URI` is set, else the embedded store)."""

    neo4j_uri: str | None = None

    @contextmanager
    def open(self) -> Iterator[GraphStore]:
        """An open graph store, closed on exit."""
        from lumikb_pipeline.graph.store import open_graph_store

        settings = get_settings()
        if self.neo4j_uri:
            settings = settings.model_copy(update={"neo4j_uri": self.neo4j_uri})
        store = open_graph_store(settings)
        try:
            yield store
        finally:
            store.close()


class LLMResource(ConfigurableResource):
    """The chunk extractor: the configured model (`LUMIKB_LLM_MODEL`), the global rate limit and the
    chunk checkpoints. The model is deliberately not overridable here: the write stage finds the
    checkpoints by the configured model."""

    def extractor(self, settings: Settings | None = None) -> ChunkExtractor:
        """A `ChunkExtractor` for `settings` (default: the environment's)."""
        from lumikb_pipeline.llm.extractor import ChunkExtractor

        return ChunkExtractor(settings or get_settings())


class RedisResource(ConfigurableResource):
    """The pipeline's Redis (progress, rate limiting, cancel flags)."""

    redis_url: str | None = None

    def client(self) -> redis.Redis:
        """A client with string responses."""
        from lumikb_pipeline.redis_client import connect

        settings = get_settings()
        if self.redis_url:
            settings = settings.model_copy(update={"redis_url": self.redis_url})
        return connect(settings)


__all__ = ["DatabaseResource", "GraphStoreResource", "LLMResource", "RedisResource"]
