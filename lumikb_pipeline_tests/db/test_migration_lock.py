"""Migrations are serialised by a lock: commands started at once on a fresh database all succeed
(issue 15: 1-2 of 4 used to fail with "table app_settings already exists")."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lumikb_pipeline.db import migrate

PROCESSES = 4


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMIKB_", "CELERY_", "DAGSTER_"))}
    env["LUMIKB_HOME"] = str(home)
    return env


@pytest.mark.slow  # four CLI processes at once: out of the fast step
def test_four_commands_at_once_on_a_fresh_lumikb_home_all_succeed(tmp_path: Path) -> None:
    for attempt in range(3):  # the race showed in about half of the runs: repeat it
        home = tmp_path / f"home-{attempt}"
        commands = [
            subprocess.Popen([str(Path(sys.executable).parent / "lumikb"), "kb", "list", "--json"],
                             env=_clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(PROCESSES)
        ]
        for command in commands:
            out, err = command.communicate(timeout=180)
            assert command.returncode == 0, err.decode()
            assert out.decode().strip() == "[]"


def _upgrade(url: str) -> str | None:
    migrate.upgrade(url)
    return migrate.current_revision(url)


def test_concurrent_upgrades_of_a_fresh_postgresql_database_all_succeed(empty_pg_url: str) -> None:
    env = {**os.environ}
    code = "import sys; from lumikb_pipeline.db import migrate; migrate.upgrade(sys.argv[1])"
    commands = [subprocess.Popen([sys.executable, "-c", code, empty_pg_url], env=env, stderr=subprocess.PIPE)
                for _ in range(PROCESSES)]
    for command in commands:
        _, err = command.communicate(timeout=180)
        assert command.returncode == 0, err.decode()[-2000:]
    with ThreadPoolExecutor(2) as pool:  # and again, in threads of one process: nothing left to do
        assert set(pool.map(_upgrade, [empty_pg_url] * 2)) == {migrate.head_revision()}
