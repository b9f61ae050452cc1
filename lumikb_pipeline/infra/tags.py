"""The run tags of each kind of work: queue, priority, retries, time limit."""

from __future__ import annotations

from lumikb_pipeline.core.config import Settings, get_settings
from lumikb_pipeline.core.names import (
    QUEUE_DOCUMENT_PROCESSING,
    QUEUE_REPROCESSING,
    TAG_MAX_RETRIES,
    TAG_MAX_RUNTIME,
    TAG_PRIORITY,
    TAG_QUEUE,
    TAG_RETRY_STRATEGY,
)


def _retries(settings: Settings) -> dict[str, str]:
    return {TAG_MAX_RETRIES: str(settings.run_max_retries), TAG_RETRY_STRATEGY: "FROM_FAILURE"}


def document_processing_tags(settings: Settings | None = None) -> dict[str, str]:
    """Normal processing: its own queue, dequeued before re-extraction work."""
    settings = settings or get_settings()
    return {
        TAG_QUEUE: QUEUE_DOCUMENT_PROCESSING,
        TAG_PRIORITY: str(settings.document_processing_priority),
        **_retries(settings),
    }


def reprocessing_tags(settings: Settings | None = None) -> dict[str, str]:
    """Work on the reprocessing queue (drift checks, invariant checks)."""
    settings = settings or get_settings()
    return {TAG_QUEUE: QUEUE_REPROCESSING, TAG_PRIORITY: str(settings.reprocessing_priority), **_retries(settings)}


def reextraction_tags(settings: Settings | None = None) -> dict[str, str]:
    """Re-extraction runs: reprocessing, with a time limit so a run whose worker died cannot hang."""
    settings = settings or get_settings()
    return {**reprocessing_tags(settings), TAG_MAX_RUNTIME: str(settings.reextraction_max_runtime_s)}
