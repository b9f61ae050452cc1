"""Fixtures of the pipeline tests: a migration scenario runner that extracts the demo corpus at one
schema version, changes the schema, and re-extracts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.db import catalog
from lumikb_pipeline.db.models import Document
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_text
from lumikb_pipeline.graph.embedded_store import EmbeddedGraphStore
from lumikb_pipeline.graph.store import GraphStore, check_invariants
from lumikb_pipeline.llm.extractor import ChunkExtractor
from lumikb_pipeline.pipeline.extract import extract_documents
from lumikb_pipeline.pipeline.work import DocumentOutcome
from lumikb_pipeline.pipeline.write import write_documents
from lumikb_pipeline_tests.fake_llm import FakeServer
from lumikb_pipeline_tests.graph.conftest import delete_kbs, neo4j_store

DEMO = Path(__file__).resolve().parents[2] / "lumikb_pipeline" / "demo"


@dataclass
class Pass:
    """One extraction pass over a KB's documents: outcomes and the fake server's call count."""

    outcomes: list[DocumentOutcome]
    server_calls: int

    @property
    def llm_calls(self) -> int:
        return sum(o.llm_calls for o in self.outcomes)

    @property
    def prompt_tokens(self) -> int:
        return sum(o.prompt_tokens for o in self.outcomes)

    @property
    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.outcomes)

    @property
    def cost_usd(self) -> float:
        return sum(o.cost_usd for o in self.outcomes)

    @property
    def strategies(self) -> set[str]:
        return {o.strategy for o in self.outcomes}


@dataclass
class Graph:
    """A KB's graph as the comparison of PRODUCT.md section 7 sees it: entities by type and key,
    relationships by type and ends, each with the titles of the documents that provide it."""

    entities: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    relationships: dict[tuple[str, str, str, str, str], frozenset[str]] = field(default_factory=dict)


@dataclass
class Scenario:
    settings: Settings
    store: GraphStore
    fake: FakeServer
    slug: str
    doc_ids: list[str] = field(default_factory=list)

    def create(self, schema_text: str, corpus: list[Path]) -> None:
        with session_scope(self.settings.effective_database_url) as session:
            catalog.create_kb(session, self.slug, parse_schema_text(schema_text))
        report = catalog.ingest(self.settings.effective_database_url, self.slug, corpus)
        assert not report.errors
        self.doc_ids = report.document_ids

    def set_schema(self, schema_text: str) -> int:
        with session_scope(self.settings.effective_database_url) as session:
            version, created = catalog.set_schema(session, self.slug, parse_schema_text(schema_text))
        assert created
        return version

    def run(self, strategy: str = "auto", claimant: str = "test") -> Pass:
        self.fake.reset()
        extractor = ChunkExtractor(self.settings)
        extracted = extract_documents(self.settings, extractor, self.doc_ids, claimant=claimant,
                                      strategy=strategy)  # type: ignore[arg-type]
        written = write_documents(self.settings, self.store, extracted, claimant=claimant)
        assert [o.status for o in written] == ["succeeded"] * len(self.doc_ids), [o.error for o in written]
        return Pass(written, len(self.fake.calls()))

    def graph(self) -> Graph:
        assert all(report.ok for report in check_invariants(self.store, self.slug))
        with session_scope(self.settings.effective_database_url) as session:
            titles = dict(session.execute(select(Document.id, Document.source).where(
                Document.id.in_(self.doc_ids))).tuples().all())
        dump = self.store.dump(self.slug)
        chunk_doc: dict[str, str] = {}
        for node in dump.nodes:
            if "Chunk" in node["labels"]:
                chunk_doc[node["properties"]["id"]] = titles[node["properties"]["doc_id"]].rsplit("/", 1)[-1]
        entities: dict[tuple[str, str], set[str]] = {}
        relationships: dict[tuple[str, str, str, str, str], set[str]] = {}
        for rel in dump.relationships:
            if rel["type"] == "MENTIONS":
                chunk = _json_id(rel["start"])[-1]
                entity = _json_id(rel["end"])
                entities.setdefault((entity[2], entity[3]), set()).add(chunk_doc[chunk])
            elif rel["type"] != "HAS_CHUNK":
                start, end = _json_id(rel["start"]), _json_id(rel["end"])
                key = (rel["type"], start[2], start[3], end[2], end[3])
                relationships[key] = {chunk_doc[c] for c in rel["properties"]["chunk_ids"]}
        return Graph({k: frozenset(v) for k, v in entities.items()},
                     {k: frozenset(v) for k, v in relationships.items()})


def _json_id(node_id: str) -> list[Any]:
    import json

    return list(json.loads(node_id))


@pytest.fixture(params=["embedded", "neo4j"])
def scenario_factory(
    request: pytest.FixtureRequest, fake_llm: FakeServer, tmp_path: Path, redis_url: str, sqlite_url: str
) -> Iterator[Callable[[str], Scenario]]:
    """Scenarios (one KB each) on one graph store (embedded, then Neo4j) and one app database."""
    import uuid

    store: GraphStore = (
        neo4j_store() if request.param == "neo4j" else EmbeddedGraphStore(tmp_path / "graph.sqlite3")
    )
    store.ensure_schema()
    settings = Settings(
        llm_model="openai/gpt-4o-mini", llm_api_base=fake_llm.api_base, llm_api_key="sk-test-key",
        llm_rate_limit="500/s", llm_max_attempts=3, database_url=sqlite_url, redis_url=redis_url,
        home=tmp_path / "home",
    )
    slugs: list[str] = []

    def make(name: str) -> Scenario:
        slug = f"t-{name}-{uuid.uuid4().hex[:8]}"
        slugs.append(slug)
        return Scenario(settings, store, fake_llm, slug)

    yield make
    if request.param == "neo4j" and os.environ.get("LUMIKB_NEO4J_URI"):
        delete_kbs(store, slugs)  # type: ignore[arg-type]
    store.close()
