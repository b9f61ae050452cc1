"""The admin's console after `lumikb demo`, as a new user finds it: the demo is run, its printed hint
is followed verbatim (from the repository root, with the environment it names) to start `dagster dev`,
and Dagster's GraphQL API is asked what the UI pages show: the partitions (readable keys that the
asset page's search filters by KB or by a word of a title), the drift schedule with its
cron (and the new one after `lumikb schedule set-cron`), the invariant checks evaluated, passing and
executable one by one, the demo's runs under their jobs and on the Backfills page, and sensors that
tick without error and start no job. A headless Chromium screenshot of the partitions page is written
to docs/ui-partitions.png when Chromium is installed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.ui

ROOT = Path(__file__).resolve().parents[2]
LUMIKB = str(Path(sys.executable).parent / "lumikb")
LOCATION = {"repositoryName": "__repository__", "repositoryLocationName": "lumikb_pipeline"}
CHECKS = {"no_duplicate_entities_or_relationships", "provenance_present", "nothing_across_kbs"}
SENSORS = {"document_partitions_sensor", "schema_version_sensor", "job_status_sensor", "graph_checks_sensor"}


@dataclass
class Console:
    url: str
    env: dict[str, str]
    hint: list[str]

    def query(self, text: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/graphql", json={"query": text, "variables": variables or {}}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return dict(body["data"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(home: Path) -> dict[str, str]:
    """A new user's shell: no lumikb or Dagster variables, the venv's tools on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMIKB_", "DAGSTER_", "CELERY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["HOME"] = str(home)
    return env


def _hint_command(hint: list[str], program: str) -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the argv of the printed command that runs `program`."""
    [line] = [line for line in hint if f" {program} " in f" {line.strip()} "]
    words = shlex.split(line)
    assignments = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        assignments[name] = value
    return assignments, words


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    work = tmp_path_factory.mktemp("ui")
    elsewhere = work / "elsewhere"  # the demo is run from another directory, as a user might
    elsewhere.mkdir()
    env = _clean_env(work)
    env["LUMIKB_HOME"] = str(work / "demo-home")
    demo = subprocess.run(
        [LUMIKB, "demo"], cwd=elsewhere, env={**env, "COLUMNS": "80"},
        capture_output=True, text=True, timeout=900,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    hint = demo.stdout[demo.stdout.index("where to look next"):].splitlines()
    assignments, argv = _hint_command(hint, "dagster")
    assert set(assignments) == {"LUMIKB_HOME", "DAGSTER_HOME"}, hint
    assert argv == ["dagster", "dev", "-w", "workspace.yaml"], hint
    root_home = ROOT / ".lumikb" / "lumikb.sqlite3"
    root_home_existed = root_home.exists()
    port = _free_port()
    shell_env = {k: v for k, v in env.items() if k != "LUMIKB_HOME"}  # only what the hint sets
    followed = {**shell_env, **assignments}
    log = (work / "dagster-dev.log").open("wb")
    process = subprocess.Popen(
        [*argv, "-p", str(port), "-h", "127.0.0.1"], cwd=ROOT, env=followed, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/server_info", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (work / "dagster-dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dagster dev did not answer within 180 s"
            time.sleep(1)
        yield Console(url, followed, hint)
    finally:
        # Ctrl-C in the terminal the hint was typed in. `dagster dev` then asks its webserver and
        # daemon to stop and waits up to 60 s for each; here it takes longer than 20 s, and the console
        # is thrown away: after 10 s the whole group is killed.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        from lumikb_pipeline.infra.redis_client import stop_embedded_redis

        stop_embedded_redis(work / "demo-home")  # the demo's own Redis outlives the processes that used it
    # Following the hint created no second app database in the repository root.
    assert root_home.exists() == root_home_existed


def test_the_hint_names_every_command_whole(console: Console) -> None:
    commands = [line.strip() for line in console.hint if line.strip() and not line.strip().startswith("#")]
    assert any("from the repository root" in line for line in console.hint)
    assert all("…" not in line for line in console.hint)
    assert [c for c in commands if c.startswith("LUMIKB_HOME=")] and len(commands) >= 4


def test_the_partitions_are_all_materialized(console: Console) -> None:
    data = console.query(
        """query { assetNodes(assetKeys: [{path: ["document_entities"]}]) {
             partitionKeys
             assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
             latestMaterializationByPartition(partitions: []) { partition }
           } }"""
    )
    [node] = data["assetNodes"]
    statuses = node["assetPartitionStatuses"]
    assert len(node["partitionKeys"]) == 36
    assert sorted(statuses["materializedPartitions"]) == sorted(node["partitionKeys"])
    assert statuses["failedPartitions"] == []
    # Each materialization says which document it is: its KB, title and source.
    events = console.query(
        """query { assetOrError(assetKey: {path: ["document_entities"]}) { ... on Asset {
             assetMaterializations(limit: 5) { partition metadataEntries {
               label ... on TextMetadataEntry { text } } } } } }"""
    )["assetOrError"]["assetMaterializations"]
    assert events
    for event in events:
        labels = {e["label"]: e.get("text") for e in event["metadataEntries"]}
        assert labels["kb"] == "demo" and labels["title"] and labels["source"], labels


def test_the_partition_keys_are_readable_and_filtering_them_by_kb_or_title_word_finds_the_documents(
    console: Console,
) -> None:
    from lumikb_pipeline.domain.partition_keys import is_valid_partition_key
    from lumikb_pipeline_tests.dagster.helpers import ui_partition_filter

    # The partitions list of the asset page: the keys as the UI receives them.
    [node] = console.query(
        """query { assetNodes(assetKeys: [{path: ["document_entities"]}]) {
             partitionKeysByDimension { name partitionKeys } } }"""
    )["assetNodes"]
    [dimension] = node["partitionKeysByDimension"]
    keys = dimension["partitionKeys"]
    assert len(keys) == 36
    for key in keys:
        assert is_valid_partition_key(key) and re.fullmatch(r"demo/[a-z0-9-]+-[0-9a-f]{8}", key), key
    assert len(max(keys, key=len)) <= 70, max(keys, key=len)
    # Which document each partition is: the title its latest materialization names.
    events = console.query(
        """query { assetOrError(assetKey: {path: ["document_entities"]}) { ... on Asset {
             assetMaterializations(limit: 500) { partition metadataEntries {
               label ... on TextMetadataEntry { text } } } } } }"""
    )["assetOrError"]["assetMaterializations"]
    titles: dict[str, str] = {}
    for event in events:  # newest first
        labels = {e["label"]: e.get("text") for e in event["metadataEntries"]}
        titles.setdefault(event["partition"], str(labels["title"]))
    assert set(titles) == set(keys)
    assert titles[next(k for k in keys if "northwind-analytics" in k)] == "Northwind Analytics company profile"

    assert ui_partition_filter(keys, "demo") == keys  # by KB slug
    assert ui_partition_filter(keys, "other-kb") == []
    for word in ("Northwind", "interview", "profile"):  # by a word of a title
        found = ui_partition_filter(keys, word)
        assert found and set(found) == {key for key, title in titles.items() if word.lower() in title.lower()}, (
            word, found)
    assert len(ui_partition_filter(keys, "northwind")) == 2  # its profile and its news


def _schedule(console: Console) -> dict[str, Any]:
    data = console.query(
        """query($repo: RepositorySelector!) { schedulesOrError(repositorySelector: $repo) {
             ... on Schedules { results { name cronSchedule executionTimezone description
                                          scheduleState { status } } } } }""",
        {"repo": LOCATION},
    )
    [schedule] = [s for s in data["schedulesOrError"]["results"] if s["name"] == "drift_check_schedule"]
    return dict(schedule)


def test_the_drift_check_is_a_schedule_with_its_cron_changed_at_run_time(console: Console) -> None:
    schedule = _schedule(console)
    assert (schedule["cronSchedule"], schedule["executionTimezone"]) == ("0 2 * * *", "UTC")
    assert schedule["scheduleState"]["status"] == "RUNNING"
    result = subprocess.run(
        [LUMIKB, "schedule", "set-cron", "*/5 * * * *",
         "--webserver", console.url],
        cwd=ROOT, env=console.env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded code location lumikb_pipeline" in result.stdout, result.stdout + result.stderr
    assert _schedule(console)["cronSchedule"] == "*/5 * * * *"
    sensors = console.query(
        """query($repo: RepositorySelector!) { sensorsOrError(repositorySelector: $repo) {
             ... on Sensors { results { name } } } }""",
        {"repo": LOCATION},
    )
    assert {s["name"] for s in sensors["sensorsOrError"]["results"]} == SENSORS  # the drift sensor is gone


def test_the_invariant_checks_ran_passed_and_can_each_be_executed(console: Console) -> None:
    data = console.query(
        """query { assetNodes(assetKeys: [{path: ["knowledge_graph"]}]) { description
             assetChecksOrError { ... on AssetChecks { checks {
               name description canExecuteIndividually executionForLatestMaterialization { status } } } } } }"""
    )
    [node] = data["assetNodes"]
    checks = {c["name"]: c for c in node["assetChecksOrError"]["checks"]}
    assert set(checks) == CHECKS
    for check in checks.values():
        assert check["canExecuteIndividually"] == "CAN_EXECUTE", check
        assert check["executionForLatestMaterialization"]["status"] == "SUCCEEDED", check
        assert "embedded graph store" in check["description"], check
    assert "embedded graph store" in node["description"] and "Neo4j" not in node["description"]


def _runs(console: Console, job: str) -> list[dict[str, Any]]:
    data = console.query(
        """query($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs { results {
             runId status tags { key value } } } } }""",
        {"filter": {"pipelineName": job, "tags": [{"key": ".dagster/repository",
                                                     "value": "__repository__@lumikb_pipeline"}]}},
    )
    return list(data["runsOrError"]["results"])


def test_every_demo_run_is_under_its_job_and_the_re_extractions_are_backfills(console: Console) -> None:
    processing = _runs(console, "document_processing_job")
    reextraction = _runs(console, "reextraction_job")
    checks = _runs(console, "graph_invariants_job")
    assert processing and reextraction and checks
    assert all(r["status"] == "SUCCESS" for r in processing + reextraction + checks)
    data = console.query(
        """query { partitionBackfillsOrError { ... on PartitionBackfills { results {
             id status numPartitions title } } } }"""
    )
    backfills = data["partitionBackfillsOrError"]["results"]
    # The demo's three re-extraction jobs: to v2 (delta), to v3 (graph-only) and the re-run at v3.
    assert len(backfills) == 3 and all(b["status"] == "COMPLETED_SUCCESS" for b in backfills), backfills
    backfill_ids = {b["id"] for b in backfills}
    run_backfills = {tag["value"] for r in reextraction for tag in r["tags"] if tag["key"] == "dagster/backfill"}
    assert run_backfills == backfill_ids


def test_the_sensors_tick_without_error_and_start_no_job(console: Console) -> None:
    query = """query($repo: RepositorySelector!) { sensorsOrError(repositorySelector: $repo) {
                 ... on Sensors { results { name sensorState { ticks(limit: 5) { status error { message } } } } } } }"""
    deadline = time.monotonic() + 120
    while True:
        sensors = console.query(query, {"repo": LOCATION})["sensorsOrError"]["results"]
        ticks = {s["name"]: s["sensorState"]["ticks"] for s in sensors}
        failures = {name: [t["error"]["message"][:300] for t in items if t["status"] == "FAILURE"]
                    for name, items in ticks.items()}
        assert not any(failures.values()), failures
        if all(ticks.get(name) for name in SENSORS):
            break
        assert time.monotonic() < deadline, f"not every sensor ticked within 120 s: {ticks}"
        time.sleep(3)
    # schema_version_sensor saw the demo at version 3 with nothing outdated: no job, no backfill.
    backfills = console.query("query { partitionBackfillsOrError { ... on PartitionBackfills { results { id } } } }")
    assert len(backfills["partitionBackfillsOrError"]["results"]) == 3  # the demo's own


def test_a_screenshot_of_the_partitions_page(console: Console, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("Chromium is not installed: apt-get install -y chromium (scripts/test installs it)")
    target = ROOT / "docs" / "ui-partitions.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1440,1000", "--virtual-time-budget=15000",
         f"--screenshot={target}", f"{console.url}/assets/document_entities?view=partitions"],
        capture_output=True, timeout=180, check=True,
    )
    assert target.stat().st_size > 20_000
