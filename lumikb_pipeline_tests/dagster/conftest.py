"""Fixtures of the Dagster tests: the whole deployment as real processes (`stack`), and helpers to
make KBs and documents in it."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lumikb_pipeline_tests.dagster.stack import Stack, stack_environment, start_stack, stop_stack

REUSE_VARIABLE = "LUMIKB_TEST_REUSE_STACK"


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A running deployment; this process's environment points at it while the fixture lives. It
    lives for this package's tests only: an idle stack's sensors and workers would otherwise share
    the CPUs with every timing-based test of the later packages (the ETA test).

    `LUMIKB_TEST_REUSE_STACK=<file.json>` reuses one left running by a developer (no teardown).
    """
    from lumikb_pipeline.db.session import dispose_engines

    reuse = os.environ.get(REUSE_VARIABLE)
    if reuse:
        info = json.loads(Path(reuse).read_text())
        running = Stack(Path(info["env"]["LUMIKB_HOME"]).parent, info["env"], info["app"], info["dg"], info["llm"],
                        info["web"], tuple(info["redis"]))  # type: ignore[arg-type]
    else:
        running = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        with stack_environment(running):
            yield running
    finally:
        dispose_engines()
        if not reuse:
            stop_stack(running)
