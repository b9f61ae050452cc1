"""Fixtures of the tracking tests: a knowledge base of short two-chunk reports on PostgreSQL, Redis,
the embedded graph and the fake LLM server with latency, configured through the environment as a
user's shell would be (`load_settings()` reads it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumikb_pipeline.core.config import get_settings
from lumikb_pipeline.db import catalog
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import parse_schema_text
from lumikb_pipeline_tests.fake_llm import FakeServer

SCHEMA = """\
entity_types:
  - name: Organization
    description: A company.
  - name: Person
    description: A person.
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
"""


def reports_kb(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, slug: str, documents: int, database_url: str, redis_url: str,
    llm: FakeServer, rate_limit: str, **environment: str,
) -> list[str]:
    """Set the environment, create KB `slug` and ingest `documents` reports; returns their ids.
    `environment` adds variables (`LUMIKB_`-style names); the graph is the embedded store."""
    for name, value in {
        "LUMIKB_HOME": str(tmp_path / "home"), "LUMIKB_DATABASE_URL": database_url, "LUMIKB_REDIS_URL": redis_url,
        "LUMIKB_LLM_MODEL": "openai/gpt-4o-mini", "LUMIKB_LLM_API_BASE": llm.api_base,
        "LUMIKB_LLM_API_KEY": "sk-test-key", "LUMIKB_LLM_RATE_LIMIT": rate_limit, "LUMIKB_LLM_MAX_IN_FLIGHT": "4",
        **environment,
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("LUMIKB_NEO4J_URI", "LUMIKB_DAGSTER_PG_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(documents):
        (corpus / f"doc-{i:03d}.md").write_text(
            f"# Report {i}\n\nAcme Corp {i} employs Jane Doe {i}.\n\nGlobex Group {i} hired John Roe {i}.\n"
        )
    with session_scope(database_url) as session:
        catalog.create_kb(session, slug, parse_schema_text(SCHEMA))
    report = catalog.ingest(database_url, slug, [corpus])
    assert not report.errors
    return report.document_ids
