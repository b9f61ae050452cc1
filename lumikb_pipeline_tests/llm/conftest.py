"""Fixtures of the LLM tests: schemas, a KB row, settings for the fake LLM server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.db.models import KnowledgeBase
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.schema import DomainSchema, parse_schema_text
from lumikb_pipeline_tests.fake_llm import FakeServer

SCHEMA_V1 = """
entity_types:
  - name: Organization
    description: A company, agency or institution.
  - name: Person
    description: A human being, e.g. an employee or founder.
  - name: Location
    description: A city, country or other place.
relationship_types:
  - name: EMPLOYS
    source: [Organization]
    target: [Person]
    description: The organisation employs the person.
  - name: LOCATED_IN
    source: [Organization, Person]
    target: [Location]
    description: Based or located in the place.
"""

# Version 2 adds a type; any change makes a new version whose checkpoints are separate.
SCHEMA_V2 = SCHEMA_V1.replace(
    "relationship_types:",
    "  - name: Product\n    description: A product or service sold by a company.\nrelationship_types:",
)


def pytest_configure(config: pytest.Config) -> None:
    # The OpenAI SDK's types make pydantic warn once on LiteLLM's first call; not about our code.
    config.addinivalue_line("filterwarnings", "ignore:Items .* are using the `ReadOnly` qualifier:UserWarning")


@pytest.fixture
def schema_v1() -> DomainSchema:
    return parse_schema_text(SCHEMA_V1)


@pytest.fixture
def schema_v2() -> DomainSchema:
    return parse_schema_text(SCHEMA_V2)


def create_kb(database_url: str, slug: str = "acme") -> int:
    """A knowledge base row (checkpoints reference it); returns its id."""
    with session_scope(database_url) as session:
        kb = KnowledgeBase(slug=slug, name=slug.title(), current_schema_version=1)
        session.add(kb)
        session.flush()
        return kb.id


@pytest.fixture
def llm_settings(fake_llm: FakeServer, pg_url: str, redis_url: str) -> Callable[..., Settings]:
    """Settings for the fake server on PostgreSQL and the test Redis; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "llm_model": "openai/gpt-4o-mini", "llm_api_base": fake_llm.api_base, "llm_api_key": "sk-test-key",
            "llm_rate_limit": "50/s", "llm_max_attempts": 3, "database_url": pg_url, "redis_url": redis_url,
        }
        return Settings(**{**values, **overrides})

    return make
