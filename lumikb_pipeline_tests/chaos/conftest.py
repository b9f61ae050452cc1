"""Fixtures of the chaos suite: one `lumikb up` stack for every scenario (`chaos_stack`, the end-to-end
harness of `dagster/stack.py` with this suite's rates and sizes, reaching Neo4j, the app database and
Redis through `neo4j_proxy`, `postgres_proxy` and `redis_proxy`, which a scenario can make unreachable), one clean
re-extraction they all
compare with (`clean_run`), and the table of what each scenario measured, printed at the end of
the session and written to `chaos-results.json` under pytest's base temporary directory."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lumikb_pipeline_tests.chaos.harness import (
    CHAOS_ENV,
    RESULTS,
    Measured,
    results_table,
    run_reextraction,
    write_results,
)
from lumikb_pipeline_tests.chaos.proxy import TcpProxy
from lumikb_pipeline_tests.conftest import required_env
from lumikb_pipeline_tests.dagster.stack import Stack, stack_environment, start_stack, stop_stack


def _proxy(variable: str, default_port: int) -> Iterator[TcpProxy]:
    """A proxy to the machine's service at the URL in `variable`, closed at the end of the session."""
    proxy = TcpProxy.for_url(required_env(variable), default_port=default_port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def neo4j_proxy() -> Iterator[TcpProxy]:
    """The stack's way to Neo4j (the machine's, behind a proxy)."""
    yield from _proxy("LUMIKB_NEO4J_URI", 7687)


@pytest.fixture(scope="session")
def postgres_proxy() -> Iterator[TcpProxy]:
    """The stack's way to its app database (the machine's PostgreSQL, behind a proxy)."""
    yield from _proxy("LUMIKB_DATABASE_URL", 5432)


@pytest.fixture(scope="session")
def redis_proxy() -> Iterator[TcpProxy]:
    """The stack's way to Redis: its broker, results, limiter and heartbeats (the machine's, behind a proxy)."""
    yield from _proxy("LUMIKB_REDIS_URL", 6379)


@pytest.fixture(scope="session")
def chaos_stack(
    tmp_path_factory: pytest.TempPathFactory, neo4j_proxy: TcpProxy, postgres_proxy: TcpProxy, redis_proxy: TcpProxy
) -> Iterator[Stack]:
    """A running deployment with this suite's settings; this process's environment points at it."""
    from lumikb_pipeline.db.session import dispose_engines

    scheme = os.environ["LUMIKB_NEO4J_URI"].split("://", 1)[0]
    overrides = {**CHAOS_ENV, "LUMIKB_NEO4J_URI": neo4j_proxy.url(scheme)}
    running = start_stack(tmp_path_factory.mktemp("chaos-stack"), overrides=overrides,
                          app_database_via=("127.0.0.1", postgres_proxy.port),
                          redis_via=("127.0.0.1", redis_proxy.port))
    try:
        with stack_environment(running):
            running.configure_llm(latency_mean_s=0.25, latency_jitter_s=0.1)
            yield running
    finally:
        dispose_engines()
        stop_stack(running)


@pytest.fixture(scope="session")
def clean_run(chaos_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Measured:
    """The re-extraction every scenario is compared with: the same documents, no fault."""
    return run_reextraction(chaos_stack, tmp_path_factory.mktemp("clean"), "clean", fault=None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    table = results_table()
    terminalreporter.write_sep("=", "chaos: per scenario")
    terminalreporter.write_line(table)
    path = Path(str(terminalreporter.config._tmp_path_factory.getbasetemp())) / "chaos-results.json"  # type: ignore[attr-defined]
    write_results(path)
    terminalreporter.write_line(f"(also in {path})")
