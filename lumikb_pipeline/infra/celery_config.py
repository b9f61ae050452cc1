"""The Celery configuration, one function for both sides: the executor that submits steps and the
workers that run them (they must agree on broker, backend and transport options).

Two traps this module exists for:
- `broker_transport_options` *replaces* dagster-celery's own dict, so its retry defaults are copied
  in here next to the `visibility_timeout`.
- With the Redis broker, a task taken by a worker that dies hard is redelivered only after
  `visibility_timeout`; it must be longer than the longest step (else a running step is delivered
  a second time), and it is: the settings refuse a timeout below the re-extraction run time limit.
"""

from __future__ import annotations

from typing import Any

from dagster_celery.defaults import broker_transport_options as DAGSTER_CELERY_TRANSPORT_OPTIONS

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.names import QUEUE_DOCUMENT_PROCESSING, Queue
from lumikb_pipeline.infra.redis_client import broker_url


def celery_config_source(settings: Settings, queue: Queue) -> dict[str, Any]:
    """The `config_source` of the Celery app for steps submitted to `queue`."""
    transport = dict(DAGSTER_CELERY_TRANSPORT_OPTIONS)
    transport["visibility_timeout"] = settings.celery_visibility_timeout_s
    return {
        # Steps go where the executor says; dagster-celery reads this as the default queue.
        "task_default_queue": queue,
        # Acknowledge after the step ran, and give a step whose worker process died back to the
        # queue: a crashed worker must not lose the step (the ledger makes a rerun safe).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One step at a time per worker process: a long step never holds others hostage.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.celery_visibility_timeout_s},
        "result_expires": 7 * 24 * 3600,
        "broker_connection_retry_on_startup": True,
        # Task events for Flower and `celery events`.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def worker_app_args(settings: Settings) -> dict[str, Any]:
    """The arguments dagster-celery's `make_app` takes, for the worker side."""
    from dagster_celery.executor import CeleryExecutor

    url = broker_url(settings)
    executor = CeleryExecutor.for_cli(
        broker=url, backend=url, config_source=celery_config_source(settings, QUEUE_DOCUMENT_PROCESSING)
    )
    return executor.app_args()
