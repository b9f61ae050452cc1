"""`kb_schema_drift`: outdated documents per KB, and a notification when a KB passes the threshold.

Materialized by the drift check (`drift_check_job`, run by `drift_check_schedule` on its cron).
"""


import json
import logging
from collections.abc import Sequence
from typing import Any

import httpx
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from lumikb_pipeline.core.scrub import scrub
from lumikb_pipeline.reextraction.drift import KbDrift
from lumikb_pipeline.resources import ReextractionResource

WEBHOOK_TIMEOUT_S = 10.0


def over_threshold(report: Sequence[KbDrift], threshold: int) -> list[KbDrift]:
    """The KBs whose outdated documents exceed `threshold` (strictly above it)."""
    return [entry for entry in report if entry.outdated > threshold]


def drift_payload(report: Sequence[KbDrift], threshold: int) -> dict[str, Any]:
    """The JSON the webhook receives."""
    return {
        "event": "lumikb.schema_drift",
        "threshold": threshold,
        "kbs_over_threshold": [entry.to_json() for entry in over_threshold(report, threshold)],
        "kbs": [entry.to_json() for entry in report],
    }


def notify(report: Sequence[KbDrift], threshold: int, webhook_url: str | None, log: logging.Logger | Any) -> bool:
    """Log a warning for each KB above the threshold and POST the report to the webhook, if any.

    Returns whether a notification was due. A webhook that fails is logged, not raised: the drift
    numbers are recorded either way.
    """
    flagged = over_threshold(report, threshold)
    if not flagged:
        return False
    for entry in flagged:
        log.warning(
            f"KB {entry.kb}: {entry.outdated} of {entry.documents} documents are older than schema version "
            f"{entry.schema_version} (threshold {threshold}); run `lumikb reextract {entry.kb} --outdated`"
        )
    if webhook_url:
        try:
            response = httpx.post(webhook_url, json=drift_payload(report, threshold), timeout=WEBHOOK_TIMEOUT_S)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning(f"the drift webhook {scrub(webhook_url)} failed: {scrub(str(exc))}")
    return True


def _markdown(report: Sequence[KbDrift], threshold: int) -> str:
    lines = ["| KB | schema version | documents | outdated |", "| --- | --- | --- | --- |"]
    for entry in report:
        mark = " ⚠" if entry.outdated > threshold else ""
        lines.append(f"| {entry.kb} | {entry.schema_version} | {entry.documents} | {entry.outdated}{mark} |")
    return "\n".join(lines)


@asset(
    group_name="monitoring",
    description=(
        "Outdated documents per KB (latest extraction older than the KB's schema version, or none); "
        "notifies above LUMIKB_DRIFT_THRESHOLD."
    ),
)
def kb_schema_drift(context: AssetExecutionContext, reextraction: ReextractionResource) -> MaterializeResult:
    report = reextraction.drift_report()
    threshold, webhook_url = reextraction.drift_policy()
    notified = notify(report, threshold, webhook_url, context.log)
    return MaterializeResult(
        metadata={
            "kbs": len(report),
            "outdated_total": sum(entry.outdated for entry in report),
            "threshold": threshold,
            "kbs_over_threshold": MetadataValue.json([e.kb for e in over_threshold(report, threshold)]),
            "notified": notified,
            "report": MetadataValue.md(_markdown(report, threshold)),
            "by_kb": MetadataValue.json(json.loads(json.dumps([e.to_json() for e in report]))),
        }
    )
