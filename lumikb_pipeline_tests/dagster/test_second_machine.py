"""Workers on several machines: `reprocessing` workers that share no folder with the Dagster processes
nor with each other still re-extract, because a run's steps hand their outputs over through the app
database (`StepOutputIOManager`), not through `DAGSTER_HOME/storage`.

Each "machine" is a Celery worker in its own mount namespace (`unshare --mount`), with a private
folder bind-mounted over `DAGSTER_HOME/storage`: the path every process is told (Dagster hands
workers the instance's storage path) leads each worker to its own folder, as on another host.
"""

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

from lumikb_pipeline.db import step_outputs
from lumikb_pipeline.db.models import JobStatus
from lumikb_pipeline.db.session import session_scope
from lumikb_pipeline_tests.dagster.helpers import (
    EXTRACT_STEP,
    SCHEMA_V2,
    WRITE_STEP,
    create_kb,
    database_url,
    ingest,
    ledger_counts,
    set_schema,
    unique_slug,
    write_documents,
)
from lumikb_pipeline_tests.dagster.stack import Stack, sensor_ticks, wait_until

pytestmark = pytest.mark.slow

MACHINES = ("machine-b", "machine-c")
STACK_WORKER = "worker-reprocessing"
DOCUMENTS = 120  # three batches of LUMIKB_REEXTRACT_BATCH_SIZE=40


def _settings() -> Any:
    from lumikb_pipeline.core.config import load_settings

    return load_settings()


def _ready_count(stack: Stack, name: str) -> int:
    return stack.log(name).count("ready.")


def _machine_worker_spec(stack: Stack, machine: str, own_storage: Path) -> Any:
    """The stack's `reprocessing` worker command, named after its machine, in a mount namespace of
    its own where `DAGSTER_HOME/storage` is `own_storage`."""
    from lumikb_pipeline.core.names import QUEUE_REPROCESSING
    from lumikb_pipeline.orchestration.processes import ServiceSpec, worker_argv

    argv = worker_argv(QUEUE_REPROCESSING, _settings())
    argv[argv.index("-n") + 1] = f"{QUEUE_REPROCESSING}@{machine}"
    argv[argv.index("-c") + 1] = "1"
    shared = Path(stack.env["DAGSTER_HOME"]) / "storage"
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return ServiceSpec(
        f"{STACK_WORKER}-{machine}",
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
         str(own_storage), str(shared), *argv],
    )


@pytest.fixture
def machines(stack: Stack) -> Iterator[dict[str, Path]]:
    """Two `reprocessing` workers on "other machines" (their own storage folders) in place of the
    stack's; the stack's worker is back afterwards."""
    from lumikb_pipeline.orchestration import processes

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and util-linux `unshare` (a mount namespace per worker), as in CI")
    settings = _settings()
    shared = Path(stack.env["DAGSTER_HOME"]) / "storage"
    shared.mkdir(parents=True, exist_ok=True)
    processes.stop_services(settings, [STACK_WORKER])
    folders = {machine: stack.root / machine / "storage" for machine in MACHINES}
    specs = []
    for machine, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        specs.append(_machine_worker_spec(stack, machine, folder))
    env = processes.service_env(settings, stack.env)
    before = {spec.name: _ready_count(stack, spec.name) for spec in specs}
    try:
        started = processes.start_services(settings, specs, env)
        for spec in specs:
            wait_until(lambda s=spec: _ready_count(stack, s.name) > before[s.name] or  # type: ignore[misc]
                       started[s.name].poll() is not None, 120, what=f"the worker {spec.name}")
            assert started[spec.name].poll() is None, stack.log(spec.name)[-2000:]
        yield folders
    finally:
        processes.stop_services(settings, [spec.name for spec in specs])
        worker = [s for s in processes.service_specs(settings, Path("unused"), code_server_port=0)
                  if s.name == STACK_WORKER]
        restarted = processes.start_services(settings, worker, env)
        if stack.processes:
            stack.processes.update(restarted)
        # Not waited for (it takes about 40 s here): a later test's steps wait in the queue until it
        # is ready, as they would for a worker that restarts in production.


def _step_output_files(storage: Path, run_ids: set[str]) -> list[Path]:
    """Files Dagster's filesystem IO manager would have left: `<storage>/<run id>/<step>/<output>`."""
    return [path for run_id in run_ids for path in (storage / run_id).rglob("*")
            if path.is_file() and "compute_logs" not in path.parts]


def _has_compute_logs(storage: Path, run_id: str) -> bool:
    return any(path.is_file() for path in (storage / run_id).rglob("*"))


def _step_workers(instance: Any, run_id: str) -> dict[str, str]:
    """Step key -> the Celery worker that executed it."""
    workers: dict[str, str] = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        metadata = event.engine_event_data.metadata
        if "Celery worker" in metadata and event.step_key:
            workers[event.step_key] = str(metadata["Celery worker"].value)
    return workers


def _stored_in(instance: Any, run_id: str) -> list[str]:
    """Where the run's extract step said its output went (its HANDLED_OUTPUT metadata)."""
    places = []
    for record in instance.all_logs(run_id, of_type=DagsterEventType.HANDLED_OUTPUT):
        event = record.dagster_event
        if event.step_key == EXTRACT_STEP:
            places.append(str(event.event_specific_data.metadata["stored_in"].value))
    return places


def test_reprocessing_workers_without_a_shared_folder_reextract_through_the_app_database(
    stack: Stack, tmp_path: Path, machines: dict[str, Path]
) -> None:
    from lumikb_pipeline_tests.dagster.test_e2e import _sensor_job

    slug = unique_slug("m2")
    create_kb(slug)
    write_documents(tmp_path / "docs", slug.replace("-", ""), DOCUMENTS)
    ids = ingest(slug, tmp_path / "docs")
    wait_until(lambda: ledger_counts(slug)[(1, "succeeded")] == DOCUMENTS, 420, 2, "the first extraction")

    started = time.monotonic()
    assert set_schema(slug, SCHEMA_V2) == 2
    job = wait_until(lambda: _sensor_job(slug, 2), 180, 1, "the sensor's re-extraction job",
                     explain=lambda: sensor_ticks(stack.instance(), "schema_version_sensor")
                     + "\ndaemon log:\n" + stack.log("daemon")[-3000:])
    wait_until(lambda: (_sensor_job(slug, 2) or job).status == JobStatus.SUCCEEDED, 480, 3,
               "the re-extraction on the other machines to succeed")
    elapsed = time.monotonic() - started
    assert ledger_counts(slug)[(2, "succeeded")] == DOCUMENTS

    instance = stack.instance()

    def finished_runs() -> list[Any]:
        # The workers close the job when its last document ends, seconds before its run ends.
        runs = list(instance.get_runs(RunsFilter(tags={"dagster/backfill": job.dagster_backfill_id})))
        return runs if runs and all(run.is_finished for run in runs) else []

    runs = wait_until(finished_runs, 120, 1, "the re-extraction's runs to end")
    run_ids = {run.run_id for run in runs}
    assert runs and all(run.status == DagsterRunStatus.SUCCESS for run in runs), [r.status for r in runs]
    step_workers = {run_id: _step_workers(instance, run_id) for run_id in run_ids}
    expected_workers = {f"reprocessing@{machine}" for machine in MACHINES}
    for run_id, workers in step_workers.items():
        assert set(workers) == {EXTRACT_STEP, WRITE_STEP}, (run_id, workers)
        assert set(workers.values()) <= expected_workers, (run_id, workers)
        assert _stored_in(instance, run_id) == ["app database (dagster_step_outputs)"], run_id

    # Each worker wrote its steps' compute logs into its own folder: the folders really were apart...
    shared = Path(stack.env["DAGSTER_HOME"]) / "storage"
    for machine, folder in machines.items():
        ran = {run_id for run_id, workers in step_workers.items() if f"reprocessing@{machine}" in workers.values()}
        assert all(_has_compute_logs(folder, run_id) for run_id in ran), machine
    assert not any(_has_compute_logs(shared, run_id) for run_id in run_ids)
    # ... and no step output is in any of them.
    assert [path for folder in [shared, *machines.values()] for path in _step_output_files(folder, run_ids)] == []

    # The hand-overs left the app database once their runs succeeded (the job-status sensor).
    def outputs_left() -> set[str]:
        with session_scope(database_url()) as session:
            return set(step_outputs.stored_runs(session)) & run_ids

    wait_until(lambda: not outputs_left(), 60, 2, "the step outputs of the succeeded runs to be deleted")
    crossed = sum(1 for workers in step_workers.values() if len(set(workers.values())) > 1)
    print(f"\n[machines] {DOCUMENTS} documents re-extracted on 2 workers with their own folders in {len(runs)} "
          f"runs, {elapsed:.0f}s; {crossed} run(s) had extract and write on different machines", flush=True)
    assert set(ids)
