"""The extractor against the fake LLM server through LiteLLM: validated results, one clear outcome per
chunk for every kind of bad answer, retries that honour Retry-After, checkpoints, cancellation."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable

import pytest

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.domain.results import ChunkExtraction, ChunkFailure
from lumikb_pipeline.domain.schema import DomainSchema
from lumikb_pipeline.llm.extractor import ChunkExtractor, ChunkInput, ChunkOutcome, RetryPolicy
from lumikb_pipeline_tests.fake_llm import FakeServer
from lumikb_pipeline_tests.llm.conftest import create_kb
from lumikb_pipeline_tests.llm.limits import early_retries

# No outage window: a provider that keeps failing fails the chunk after its attempts.
FAST_RETRIES = RetryPolicy(max_attempts=3, max_rate_limited=20, backoff_base_s=0.05, backoff_max_s=0.2,
                           outage_window_s=0)


def chunk(i: int, text: str | None = None) -> ChunkInput:
    text = text or (f"Acme Corp {i} hired Dr. Jane Doe {i} in Berlin. The Bank of Nordland, based in Oslo, "
                    f"said Jane Doe {i} would join its board.")
    return ChunkInput(id=f"chunk-{i}", text=text, content_hash=hashlib.sha256(text.encode()).hexdigest())


def extractions(results: list[ChunkOutcome]) -> list[ChunkExtraction]:
    assert all(isinstance(r, ChunkExtraction) for r in results), [r for r in results if isinstance(r, ChunkFailure)]
    return [r for r in results if isinstance(r, ChunkExtraction)]


@pytest.fixture
def extract(
    llm_settings: Callable[..., Settings], pg_url: str, schema_v1: DomainSchema
) -> Callable[..., list[ChunkOutcome]]:
    """Extract chunks of a fresh KB at schema version 1 (keyword arguments go to the extractor)."""
    kb_id = create_kb(pg_url)

    def run(chunks: list[ChunkInput], schema: DomainSchema = schema_v1, version: int = 1,
            settings: Settings | None = None, **options: object) -> list[ChunkOutcome]:
        options.setdefault("retry", FAST_RETRIES)
        extractor = ChunkExtractor(settings or llm_settings(), **options)  # type: ignore[arg-type]
        return extractor.extract_sync(kb_id, version, schema, chunks)

    return run


def test_chunks_become_validated_extractions_with_usage_and_cost(extract: Callable[..., list[ChunkOutcome]],
                                                                  fake_llm: FakeServer) -> None:
    results = extractions(extract([chunk(i) for i in range(5)]))

    assert [r.chunk_id for r in results] == [f"chunk-{i}" for i in range(5)]
    first = results[0]
    assert {(e.name, e.type) for e in first.entities} >= {("Acme Corp", "Organization"), ("Jane Doe", "Person")}
    assert ("Acme Corp", "EMPLOYS", "Jane Doe") in {(r.source, r.type, r.target) for r in first.relationships}
    assert first.llm_calls == 1 and first.prompt_tokens > 100 and first.completion_tokens > 10
    assert first.cost_usd > 0 and not first.from_checkpoint
    assert len(fake_llm.calls()) == 5


def test_calls_log_one_line_per_batch_not_one_per_request(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """LiteLLM's and the HTTP clients' INFO line per call would be 40 lines a second at 20/s, written
    by the event loop that prepares the calls; the OpenAI SDK's client is httpx2, with its own logger."""
    with caplog.at_level(logging.INFO):
        extractions(extract([chunk(i) for i in range(3)]))

    assert len(fake_llm.calls()) == 3
    per_request = [r for r in caplog.records if r.levelno < logging.WARNING and r.name.split(".")[0] in
                   {"httpx", "httpx2", "httpcore", "LiteLLM"}]
    assert per_request == []
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("extracted 3 chunks")]


# --- every kind of bad answer has a clear per-chunk outcome (done-means 3) ---------------------------

def test_malformed_json_is_repaired_into_the_same_result_as_a_clean_answer(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    clean = extractions(extract([chunk(1)]))[0]
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["malformed_json"])

    repaired = extractions(extract([chunk(1)], version=2))[0]

    assert repaired.entities == clean.entities and repaired.relationships == clean.relationships
    assert repaired.llm_calls == 1 and repaired.dropped == []


def test_a_truncated_answer_keeps_what_was_complete_and_counts_the_cut_item(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    full = extractions(extract([chunk(1)]))[0]
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["truncated"], truncate_at=0.7)

    cut = extractions(extract([chunk(1)], version=2))[0]

    assert cut.llm_calls == 1
    assert [d.reason for d in cut.dropped] == ["truncated"]
    assert 0 < len(cut.entities) + len(cut.relationships) < len(full.entities) + len(full.relationships)
    assert set(cut.entities) <= set(full.entities)


def test_an_answer_truncated_beyond_repair_is_retried_then_fails_with_the_reason(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["truncated"], truncate_at=0.01)

    [result] = extract([chunk(1)])

    assert isinstance(result, ChunkFailure) and result.reason.startswith("truncated_answer:")
    assert result.llm_calls == 3 and len(fake_llm.calls()) == 3


def test_prose_is_retried_then_fails_with_the_reason(extract: Callable[..., list[ChunkOutcome]],
                                                     fake_llm: FakeServer) -> None:
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["prose"])

    [result] = extract([chunk(1)])

    assert isinstance(result, ChunkFailure) and result.reason.startswith("prose_answer:")
    assert "after 3 call(s)" in result.reason and result.llm_calls == 3


def test_an_empty_answer_is_retried_then_fails_with_the_reason(extract: Callable[..., list[ChunkOutcome]],
                                                               fake_llm: FakeServer) -> None:
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["empty"])

    [result] = extract([chunk(1)])

    assert isinstance(result, ChunkFailure) and result.reason.startswith("empty_answer:")
    assert result.llm_calls == 3


def test_unknown_types_are_dropped_and_counted_and_the_rest_is_kept(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["unknown_types"])

    [result] = extractions(extract([chunk(1)]))

    reasons = {(d.kind, d.reason) for d in result.dropped}
    assert reasons == {("entity", "unknown_type"), ("relationship", "unknown_type")}
    assert result.entities and {e.type for e in result.entities} <= schema_v1.entity_type_names
    assert all(r.type in {"EMPLOYS", "LOCATED_IN"} for r in result.relationships)


def test_relationships_with_endpoints_outside_the_schema_are_dropped_and_counted(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["bad_endpoints"])

    [result] = extractions(extract([chunk(1)]))

    assert result.relationships == []
    assert result.dropped and {d.reason for d in result.dropped} == {"endpoint_not_allowed"}
    assert result.entities  # the entities themselves were fine


def test_a_mix_of_bad_answers_and_server_errors_ends_with_every_chunk_extracted(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    fake_llm.configure(malformed_rate=0.3, malformed_kinds=["prose", "empty"], rate_5xx=0.2, seed=3)

    results = extract([chunk(i) for i in range(20)], retry=RetryPolicy(max_attempts=8, backoff_base_s=0.02,
                                                                        backoff_max_s=0.1))

    assert len(extractions(results)) == 20
    assert sum(r.llm_calls for r in results) == len(fake_llm.calls()) > 20


# --- retries and the provider's errors ------------------------------------------------------------

@pytest.mark.slow  # waits out Retry-After: out of the fast step
def test_429s_are_retried_no_sooner_than_retry_after(extract: Callable[..., list[ChunkOutcome]],
                                                     fake_llm: FakeServer) -> None:
    fake_llm.configure(rate_429=0.4, retry_after_s=0.5, seed=5)

    results = extract([chunk(i) for i in range(12)])

    assert len(extractions(results)) == 12
    calls = fake_llm.calls()
    assert any(c["status"] == 429 for c in calls)
    assert early_retries(calls) == []


def test_an_authentication_error_fails_the_chunk_at_once_with_a_hint(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    fake_llm.configure(require_api_key="sk-the-right-one")

    [result] = extract([chunk(1)])

    assert isinstance(result, ChunkFailure) and result.reason.startswith("auth_error:")
    assert "LUMIKB_LLM_API_KEY" in result.reason and result.llm_calls == 1


def test_server_errors_that_do_not_stop_fail_the_chunk_after_the_attempts(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    fake_llm.configure(rate_5xx=1.0)

    [result] = extract([chunk(1)])

    assert isinstance(result, ChunkFailure) and result.reason.startswith("provider_error:")
    assert "HTTP 500" in result.reason and result.llm_calls == 3


def test_an_outage_shorter_than_the_window_is_waited_out_and_the_chunk_extracted(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    fake_llm.configure(rate_5xx=1.0)
    recovers = threading.Timer(1.5, lambda: fake_llm.configure(rate_5xx=0.0))
    recovers.start()
    try:
        [result] = extractions(extract([chunk(1)], retry=RetryPolicy(
            max_attempts=2, backoff_base_s=0.05, backoff_max_s=0.2, outage_window_s=30)))
    finally:
        recovers.cancel()

    statuses = [c["status"] for c in fake_llm.calls()]
    # More 500s than the attempts allow, and then the answer.
    assert statuses[-1] == 200 and statuses.count(500) > 2 and result.llm_calls == len(statuses)


def test_an_outage_longer_than_the_window_fails_the_chunk_with_how_long_it_lasted(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    fake_llm.configure(rate_5xx=1.0)

    started = time.monotonic()
    [result] = extract([chunk(1)], retry=RetryPolicy(max_attempts=2, backoff_base_s=0.05, backoff_max_s=0.2,
                                                     outage_window_s=1.5))

    assert time.monotonic() - started >= 1.5
    assert isinstance(result, ChunkFailure) and result.reason.startswith("provider_error:")
    assert result.llm_calls > 2 and " s)" in result.reason and "LUMIKB_LLM_RETRY_WINDOW_S" in result.reason


def test_unusable_answers_fail_the_chunk_after_the_attempts_whatever_the_window(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer
) -> None:
    fake_llm.configure(malformed_rate=1.0, malformed_kinds=["prose"])

    [result] = extract([chunk(1)], retry=RetryPolicy(max_attempts=2, backoff_base_s=0.05, outage_window_s=600))

    assert isinstance(result, ChunkFailure) and result.llm_calls == 2


# --- checkpoints (done-means 4) -------------------------------------------------------------------

class DatabaseAwayFor(ChunkExtractor):
    """An extractor whose checkpoint writes fail while the app database is away (the first
    `away_s` after the first write), as during a PostgreSQL restart."""

    away_s = 4.0  # longer than the three tries over 3.5 s this once had
    first_try: float | None = None

    def _save(self, *args: object) -> None:
        self.first_try = self.first_try or time.monotonic()
        if time.monotonic() - self.first_try < self.away_s:
            raise ConnectionError("connection to server at 127.0.0.1 failed: Connection refused")
        super()._save(*args)  # type: ignore[arg-type]


@pytest.mark.slow  # a real PostgreSQL restart: out of the fast step
def test_a_database_restart_while_a_result_is_stored_is_waited_out_and_the_call_not_paid_again(
    llm_settings: Callable[..., Settings], pg_url: str, schema_v1: DomainSchema, fake_llm: FakeServer
) -> None:
    extractor = DatabaseAwayFor(llm_settings(), retry=FAST_RETRIES)
    kb_id = create_kb(pg_url)

    [result] = extractor.extract_sync(kb_id, 1, schema_v1, [chunk(1)])

    assert isinstance(result, ChunkExtraction) and len(fake_llm.calls()) == 1
    [again] = ChunkExtractor(llm_settings(), retry=FAST_RETRIES).extract_sync(kb_id, 1, schema_v1, [chunk(1)])
    assert isinstance(again, ChunkExtraction) and again.from_checkpoint and len(fake_llm.calls()) == 1


def test_a_result_that_cannot_be_stored_within_the_window_fails_the_chunk_with_how_long_it_tried(
    llm_settings: Callable[..., Settings], pg_url: str, schema_v1: DomainSchema
) -> None:
    extractor = DatabaseAwayFor(llm_settings(), retry=FAST_RETRIES)
    extractor.away_s, extractor.checkpoint_save_window_s = 600.0, 1.0

    [result] = extractor.extract_sync(create_kb(pg_url), 1, schema_v1, [chunk(1)])

    assert isinstance(result, ChunkFailure) and result.reason.startswith("checkpoint_not_saved:")
    assert re.search(r"for [12] s \(\d+ tries", result.reason) and "LUMIKB_DATABASE_URL" in result.reason

def test_extracting_the_same_chunks_again_makes_no_call_and_a_schema_change_sends_every_chunk_again(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer, schema_v2: DomainSchema
) -> None:
    chunks = [chunk(i) for i in range(6)]
    first = extractions(extract(chunks))
    assert len(fake_llm.calls()) == 6
    fake_llm.reset()

    again = extractions(extract(chunks))

    assert fake_llm.calls() == []
    assert all(r.from_checkpoint and r.llm_calls == 0 and r.cost_usd == 0 for r in again)
    assert [r.entities for r in again] == [r.entities for r in first]
    assert [r.chunk_id for r in again] == [c.id for c in chunks]

    evolved = extractions(extract(chunks, schema=schema_v2, version=2))

    assert len(fake_llm.calls()) == 6
    assert not any(r.from_checkpoint for r in evolved)


def test_identical_chunks_are_sent_once(extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer) -> None:
    same = "Acme Corp hired Jane Doe."
    chunks = [chunk(i, same) for i in range(4)]

    results = extractions(extract(chunks))

    assert len(fake_llm.calls()) == 1
    assert [r.chunk_id for r in results] == [c.id for c in chunks]
    assert [r.llm_calls for r in results] == [1, 0, 0, 0]
    assert all(r.entities == results[0].entities for r in results)


def test_a_changed_model_or_prompt_does_not_reuse_checkpoints(
    extract: Callable[..., list[ChunkOutcome]], fake_llm: FakeServer, schema_v1: DomainSchema,
    llm_settings: Callable[..., Settings],
) -> None:
    chunks = [chunk(i) for i in range(2)]
    extractions(extract(chunks))

    extractions(extract(chunks, schema=schema_v1.model_copy(update={"prompt_version": 2})))
    extractions(extract(chunks, settings=llm_settings(llm_model="openai/gpt-4o")))

    assert len(fake_llm.calls()) == 6


# --- cancellation ---------------------------------------------------------------------------------

def test_no_call_starts_after_should_stop_says_stop(
    llm_settings: Callable[..., Settings], pg_url: str, fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    fake_llm.configure(latency_mean_s=0.05)
    stop = threading.Event()
    done: list[ChunkOutcome] = []

    def on_result(result: ChunkOutcome) -> None:
        done.append(result)
        if len(done) == 3:
            stop.set()

    extractor = ChunkExtractor(llm_settings(llm_rate_limit="20/s"), concurrency=2, retry=FAST_RETRIES)
    results = extractor.extract_sync(create_kb(pg_url), 1, schema_v1, [chunk(i) for i in range(20)],
                                     should_stop=stop.is_set, on_result=on_result)

    calls = len(fake_llm.calls())
    cancelled = [r for r in results if isinstance(r, ChunkFailure) and r.reason == "cancelled"]
    assert calls == sum(r.llm_calls for r in results)
    assert 3 <= calls <= 3 + 2  # the calls already in flight finish; none starts
    assert len(cancelled) == 20 - calls


def test_extract_sync_works_from_any_thread(
    llm_settings: Callable[..., Settings], pg_url: str, fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    extractor = ChunkExtractor(llm_settings(), retry=FAST_RETRIES)
    kb_id = create_kb(pg_url)
    outcomes: list[list[ChunkOutcome]] = []
    threads = [
        threading.Thread(target=lambda i=i: outcomes.append(
            extractor.extract_sync(kb_id, 1, schema_v1, [chunk(10 * i + j) for j in range(3)])))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(len(extractions(o)) for o in outcomes) == [3, 3, 3]


# --- nothing escapes --------------------------------------------------------------------------------

def test_an_unreachable_redis_fails_each_chunk_with_a_hint(
    llm_settings: Callable[..., Settings], pg_url: str, fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    extractor = ChunkExtractor(llm_settings(redis_url="redis://127.0.0.1:1/0"), retry=FAST_RETRIES)

    results = extractor.extract_sync(create_kb(pg_url), 1, schema_v1, [chunk(1), chunk(2)])

    assert all(isinstance(r, ChunkFailure) and r.reason.startswith("rate_limiter_unavailable:") for r in results)
    assert "LUMIKB_REDIS_URL" in results[0].reason  # type: ignore[union-attr]
    assert fake_llm.calls() == []


@pytest.mark.slow  # seconds of real waiting: out of the fast step
def test_an_answer_that_comes_while_redis_restarts_is_kept_and_not_paid_again(
    llm_settings: Callable[..., Settings], pg_url: str, redis_url: str, fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    """The call's in-flight lease cannot be given back while Redis is away: the answer is kept all
    the same (the lease expires on its own), not thrown away and paid for again."""
    from lumikb_pipeline_tests.chaos.proxy import TcpProxy

    proxy = TcpProxy.for_url(redis_url, default_port=6379)
    fake_llm.configure(latency_mean_s=1.0, latency_jitter_s=0.0)
    try:
        url = f"{proxy.url('redis')}/{redis_url.rsplit('/', 1)[1]}"
        extractor = ChunkExtractor(llm_settings(redis_url=url), retry=FAST_RETRIES)
        kb_id = create_kb(pg_url)
        results: list[ChunkOutcome] = []
        thread = threading.Thread(
            target=lambda: results.extend(extractor.extract_sync(kb_id, 1, schema_v1, [chunk(1)])))
        thread.start()
        deadline = time.monotonic() + 20
        while not fake_llm.calls():
            assert time.monotonic() < deadline, "the call never reached the server"
            time.sleep(0.02)
        proxy.unreachable()  # Redis restarting while the call waits for its answer
        time.sleep(2.0)
        proxy.reachable()
        thread.join(timeout=30)
    finally:
        proxy.close()
        fake_llm.configure(latency_mean_s=0.0)

    assert len(extractions(results)) == 1 and len(fake_llm.calls()) == 1


def test_an_unreachable_database_fails_each_chunk_with_a_hint(
    llm_settings: Callable[..., Settings], fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    settings = llm_settings(database_url="postgresql+psycopg://lumikb:lumikb@127.0.0.1:1/nothing")
    extractor = ChunkExtractor(settings, retry=FAST_RETRIES)

    results = extractor.extract_sync(1, 1, schema_v1, [chunk(1)])

    assert isinstance(results[0], ChunkFailure) and results[0].reason.startswith("checkpoint_lookup_failed:")
    assert "LUMIKB_DATABASE_URL" in results[0].reason and fake_llm.calls() == []


def test_the_async_api_runs_in_the_callers_event_loop(
    llm_settings: Callable[..., Settings], pg_url: str, fake_llm: FakeServer, schema_v1: DomainSchema
) -> None:
    import asyncio

    extractor = ChunkExtractor(llm_settings(), retry=FAST_RETRIES)
    kb_id = create_kb(pg_url)

    results = asyncio.run(extractor.extract(kb_id, 1, schema_v1, [chunk(1), chunk(2)]))

    assert len(extractions(results)) == 2
