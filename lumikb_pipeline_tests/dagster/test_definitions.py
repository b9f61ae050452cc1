"""The code location loads, and wires what PRODUCT.md section 6 promises."""

import os
import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, Definitions

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.infra.celery_config import celery_config_source

ROOT = Path(__file__).resolve().parents[2]


def test_definitions_are_loadable() -> None:
    from lumikb_pipeline.definitions import defs

    Definitions.validate_loadable(defs)


def test_loading_the_definitions_does_not_import_litellm() -> None:
    # Every run's own process loads the definitions and never calls the LLM (its steps run on Celery
    # workers); LiteLLM's ~3 s of imports would be paid again by every batch run.
    probe = "import sys, lumikb_pipeline.definitions; print(sorted(m for m in sys.modules if m.startswith('litellm')))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_workspace_loads_with_the_dagster_cli_from_a_clone_with_no_variables_set(tmp_path: Path) -> None:
    # As a newcomer runs it: the repository root, nothing of ours or Dagster's in the environment.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    before = set(ROOT.iterdir())
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr
    assert {path.name for path in set(ROOT.iterdir()) - before} <= {".lumikb"}


def test_jobs_run_on_their_queues() -> None:
    from lumikb_pipeline.definitions import defs

    expected = {
        "document_processing_job": "document_processing",
        "reextraction_job": "reprocessing",
        "drift_check_job": "reprocessing",
        "graph_invariants_job": "reprocessing",
        "__ASSET_JOB": "reprocessing",  # backfills launched from the UI
    }
    for name, queue in expected.items():
        assert defs.resolve_job_def(name).executor_def.name == f"celery_{queue}", name
    assert defs.resolve_job_def("document_processing_job").tags["dagster/priority"] > "0"
    for queue in ("document_processing", "reprocessing"):
        assert celery_config_source(Settings(), queue)["task_default_queue"] == queue  # type: ignore[arg-type]


def test_extraction_runs_retry_from_failure_and_reextraction_runs_have_a_time_limit() -> None:
    from lumikb_pipeline.definitions import defs

    for name in ("document_processing_job", "reextraction_job"):
        tags = defs.resolve_job_def(name).tags
        assert tags["dagster/retry_strategy"] == "FROM_FAILURE" and int(tags["dagster/max_retries"]) >= 1
    assert int(defs.resolve_job_def("reextraction_job").tags["dagster/max_runtime"]) > 0


def test_document_entities_is_two_ops_each_in_its_pool() -> None:
    from lumikb_pipeline.assets import document_entities

    pools = {node.name: node.definition.pool for node in document_entities.node_def.nodes}  # type: ignore[attr-defined]
    assert pools == {"extract_document_entities": "lumikb_llm", "write_document_entities": "lumikb_graph_write"}
    assert document_entities.partitions_def is not None
    assert document_entities.backfill_policy is not None
    from lumikb_pipeline.core.config import get_settings

    assert document_entities.backfill_policy.max_partitions_per_run == get_settings().reextract_batch_size


def test_invariant_checks_target_the_knowledge_graph_and_stay_out_of_extraction_runs() -> None:
    from lumikb_pipeline.definitions import defs

    asset_graph = defs.resolve_asset_graph()
    checks = asset_graph.asset_check_keys
    assert {key.name for key in checks} == {
        "no_duplicate_entities_or_relationships", "provenance_present", "nothing_across_kbs"}
    assert {key.asset_key for key in checks} == {AssetKey("knowledge_graph")}
    # Dagster runs an asset's checks in every run of a backfill of that asset (UI or ours): so no
    # invariant check may be a check of document_entities.
    assert not asset_graph.get_check_keys_for_assets({AssetKey("document_entities")})
    for name in ("document_processing_job", "reextraction_job"):
        assert not defs.resolve_job_def(name).asset_layer.asset_graph.asset_check_keys & checks
    for name in ("drift_check_job", "graph_invariants_job"):
        job_checks = defs.resolve_job_def(name).asset_layer.asset_graph.asset_check_keys
        assert job_checks == checks, name
    assert AssetKey("kb_schema_drift") in asset_graph.get_all_asset_keys()


def _one_sentence(text: str | None) -> bool:
    """One sentence on one line: what it does and when, as the UI lists it."""
    return bool(text) and "\n" not in str(text) and str(text).rstrip(".").count(". ") == 0 and len(str(text)) <= 200


def test_every_asset_job_sensor_and_schedule_has_a_one_sentence_description() -> None:
    from lumikb_pipeline.definitions import defs

    sensors = {sensor.name: sensor for sensor in defs.sensors or []}  # type: ignore[union-attr]
    assert set(sensors) == {
        "document_partitions_sensor", "schema_version_sensor", "job_status_sensor", "graph_checks_sensor"
    }
    for sensor in sensors.values():
        assert sensor.default_status.value == "RUNNING"
    schedules = {schedule.name: schedule for schedule in defs.schedules or []}  # type: ignore[union-attr]
    assert set(schedules) == {"drift_check_schedule"}
    described: dict[str, str | None] = {name: s.description for name, s in {**sensors, **schedules}.items()}
    described.update({job.name: job.description for job in defs.jobs or []})  # type: ignore[union-attr]
    graph = defs.resolve_asset_graph()
    described.update({key.to_user_string(): graph.get(key).description for key in graph.get_all_asset_keys()})
    described.update({str(key): graph.get_check_spec(key).description for key in graph.asset_check_keys})
    assert {name for name, text in described.items() if not _one_sentence(text)} == set(), described


def test_the_invariant_checks_run_on_their_own_and_pass_on_an_empty_graph(lumikb_env: object) -> None:
    from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

    from lumikb_pipeline.assets import KNOWLEDGE_GRAPH, document_entities, graph_invariants, knowledge_graph
    from lumikb_pipeline.core.config import get_settings
    from lumikb_pipeline.db.migrate import ensure_database
    from lumikb_pipeline.definitions import defs
    from lumikb_pipeline_tests.dagster.helpers import create_kb

    ensure_database(get_settings().effective_database_url)
    create_kb("checked")
    checks_only = define_asset_job(
        "checks_only", selection=AssetSelection.checks_for_assets(KNOWLEDGE_GRAPH), executor_def=in_process_executor
    )
    local = Definitions(assets=[document_entities, knowledge_graph], asset_checks=[graph_invariants],
                        jobs=[checks_only], resources=defs.resources)

    result = local.resolve_job_def("checks_only").execute_in_process()

    evaluations = result.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} == {
        "no_duplicate_entities_or_relationships", "provenance_present", "nothing_across_kbs"}
    assert all(e.passed and e.asset_key == KNOWLEDGE_GRAPH for e in evaluations)
    assert all(e.metadata["kbs_checked"].value == 1 for e in evaluations)
    assert not result.asset_materializations_for_node("document_entities")
