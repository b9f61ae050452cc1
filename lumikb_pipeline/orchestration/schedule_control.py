"""Applying `lumikb schedule` to a running Dagster: reload the code location so the drift schedule
is rebuilt on the stored cron, and start or stop the schedule in the Dagster instance."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import httpx

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import DEFINITIONS_MODULE, LOCATION_NAME
from lumikb_pipeline.core.scrub import scrub

RELOAD_MUTATION = """
mutation Reload($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) {
    __typename
    ... on WorkspaceLocationEntry { locationOrLoadError { __typename ... on PythonError { message } } }
    ... on ReloadNotSupported { message }
    ... on RepositoryLocationNotFound { message }
    ... on PythonError { message }
  }
}
"""


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    message: str


def webserver_url(settings: Settings) -> str:
    """Where `lumikb up` serves the Dagster UI (`LUMIKB_WEBSERVER_HOST`, `LUMIKB_WEBSERVER_PORT`)."""
    return f"http://{settings.webserver_host}:{settings.webserver_port}"


def reload_code_location(url: str, location: str = LOCATION_NAME, timeout_s: float = 60.0) -> ReloadOutcome:
    """Ask the Dagster webserver at `url` to reload `location` (its GraphQL `reloadRepositoryLocation`):
    the definitions are imported again, so the drift schedule carries the stored cron; the daemon
    picks the new snapshot up when it next refreshes its workspace (every minute)."""
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/graphql", json={"query": RELOAD_MUTATION, "variables": {"name": location}},
            timeout=timeout_s,
        )
        response.raise_for_status()
        result = response.json()["data"]["reloadRepositoryLocation"]
    except (httpx.HTTPError, KeyError, ValueError, TypeError) as exc:
        return ReloadOutcome(False, f"no Dagster webserver answered at {scrub(url)} ({type(exc).__name__})")
    kind = result["__typename"]
    if kind == "WorkspaceLocationEntry":
        loaded = result["locationOrLoadError"] or {}
        if loaded.get("__typename") == "RepositoryLocation":
            return ReloadOutcome(True, f"reloaded code location {location} at {scrub(url)}")
        return ReloadOutcome(False, f"code location {location} failed to load: {scrub(str(loaded.get('message')))}")
    return ReloadOutcome(False, f"{kind}: {scrub(str(result.get('message')))}")


def set_schedule_running(settings: Settings, running: bool) -> str:
    """Start or stop `drift_check_schedule` in the Dagster instance (`DAGSTER_HOME`); the daemon reads
    the state on its next tick. Returns the schedule's new status."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.remote_representation.code_location import InProcessCodeLocation
    from dagster._core.scheduler.instigation import InstigatorStatus
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    from lumikb_pipeline.infra.dagster_instance import open_instance
    from lumikb_pipeline.schedules.drift_check import SCHEDULE_NAME

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFINITIONS_MODULE),
        location_name=LOCATION_NAME,
    )
    instance = open_instance(settings)
    with InProcessCodeLocation(origin, instance=instance) as location:
        schedule = location.get_repository("__repository__").get_schedule(SCHEDULE_NAME)
        if running:
            state = instance.start_schedule(schedule)
        else:
            state = instance.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)
    return "running" if state.status == InstigatorStatus.RUNNING else "stopped"
