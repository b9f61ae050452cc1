"""The API key never leaks: not into logs (ours or LiteLLM's, even at DEBUG), not into exception
messages, not into stored errors or checkpoints, even when the provider echoes it back (done-means 5)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator

import litellm
import pytest
from sqlalchemy import select

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.db.models import ChunkCheckpoint
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline.domain.results import ChunkFailure
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm.extractor import ChunkExtractor, ChunkInput, RetryPolicy
from lumikb_pipeline_tests.fake_llm import FakeServer
from lumikb_pipeline_tests.llm.conftest import create_kb

TOKEN = secrets.token_hex(16)
SENTINEL = f"sk-SENTINEL-{TOKEN}"


@pytest.fixture
def litellm_debug() -> Iterator[None]:
    """LiteLLM at its most talkative, as someone debugging a provider would set it."""
    litellm._turn_on_debug()
    try:
        yield
    finally:
        litellm.set_verbose = False
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def chunk(i: int) -> ChunkInput:
    text = f"Acme Corp {i} hired Dr. Jane Doe in Berlin."
    return ChunkInput(id=f"chunk-{i}", text=text, content_hash=hashlib.sha256(text.encode()).hexdigest())


@pytest.mark.parametrize("provider_behaviour", [
    {"require_api_key": "sk-some-other-key"},  # a 401 that quotes the key it was given
    {"rate_5xx": 1.0, "echo_key_in_5xx": True},  # 500s that quote the Authorization header
    {},  # success: only the request itself carries the key
])
def test_the_api_key_appears_in_no_log_error_or_stored_result(
    provider_behaviour: dict[str, object], fake_llm: FakeServer, llm_settings: Callable[..., Settings],
    pg_url: str, schema_v1: DomainSchema, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
    litellm_debug: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_llm.configure(**provider_behaviour)
    extractor = ChunkExtractor(llm_settings(llm_api_key=SENTINEL),
                               retry=RetryPolicy(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02,
                                                 outage_window_s=0))

    results = extractor.extract_sync(create_kb(pg_url), 1, schema_v1, [chunk(1), chunk(2)])

    with session_scope(pg_url) as session:
        stored = [row.result for row in session.scalars(select(ChunkCheckpoint))]
    out, err = capfd.readouterr()
    failures = [r.reason for r in results if isinstance(r, ChunkFailure)]
    everything = "\n".join([caplog.text, out, err, *failures, repr(results), repr(stored)])
    assert len(caplog.records) > 10  # LiteLLM's debug logging was really captured
    assert TOKEN not in everything
    if provider_behaviour:
        assert len(failures) == 2 and all("[REDACTED]" in reason for reason in failures), failures
    else:
        assert failures == [] and len(stored) == 2
