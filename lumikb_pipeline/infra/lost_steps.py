"""Celery steps whose worker died are delivered again within a minute, not after the visibility timeout.

With the Redis broker a step taken by a worker stays in the broker's `unacked` hash until the worker
acknowledges it (`task_acks_late`). When only a worker's child dies, Celery gives the step back at
once (`task_reject_on_worker_lost`); when the whole worker dies (its process group killed, the host
lost) nobody does until `visibility_timeout` (hours: it must outlast the longest step), and the
Dagster run waits on the step all that time.

So every step beats while it runs (`step_heartbeat`, from the worker's `task_prerun`/`task_postrun`
signals: a key `lumikb:step-heartbeat:<task id>` that expires `HEARTBEAT_TTL_S` after the last beat),
and the job-status sensor runs `requeue_lost_steps`: a message unacknowledged for more than
`LOST_AFTER_S` whose task has no heartbeat and that no live worker reports as active or reserved is
put back at the head of its queue. The redelivered step runs again under the same Dagster run (the
run waits on the same task id); the ledger claim (the run's root id) and the chunk checkpoints make
the second execution take over the first one's documents without paying again for what it finished.

A step can also vanish from the broker altogether: Redis restarted without its data (the embedded
Redis keeps none) takes the queued messages, the `unacked` hash and the stored results with it, and
the Dagster run would wait on its steps until its max runtime. So the run's executor watches each
step it submitted (`infra.executor`) and submits it again once `step_gone_from_broker` has held for
`GONE_AFTER_S`: no result, no heartbeat, not in its queue, not in `unacked`, not held by a live
worker. A step still running on a live worker keeps beating (its heartbeat is written again within
`HEARTBEAT_INTERVAL_S` of Redis coming back) and is left to finish; its result reaches the new Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from lumikb_pipeline.core.config import Settings
from lumikb_pipeline.core.repeating import repeating

HEARTBEAT_PREFIX = "lumikb:step-heartbeat:"
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 20.0
# A message must have been unacknowledged this long (and its task silent) before it counts as
# lost: longer than the heartbeat's time to live, so a step that started beating is never taken.
LOST_AFTER_S = 30.0
INSPECT_TIMEOUT_S = 2.0

# A submitted step is taken for lost by the broker after this long without a result, a heartbeat, a
# place in its queue or a worker holding it: longer than a heartbeat's interval after Redis is back.
GONE_AFTER_S = 30.0
GONE_CHECK_INTERVAL_S = 5.0

# kombu's Redis transport keeps the messages workers hold in these keys of the broker's database.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


@contextmanager
def step_heartbeat(settings: Settings, task_id: str, interval_s: float = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
    """Keep `lumikb:step-heartbeat:<task_id>` alive while the block runs (a Celery step)."""
    from lumikb_pipeline.infra import redis_client

    client = redis_client.connect(settings)
    key = f"{HEARTBEAT_PREFIX}{task_id}"

    def beat() -> None:
        client.set(key, "1", ex=int(HEARTBEAT_TTL_S))

    try:
        beat()  # before the step starts, so it is never seen running without a heartbeat
    except Exception:  # noqa: BLE001, S110 - Redis away: the next beat tries again
        pass
    try:
        with repeating(beat, interval_s, f"step-heartbeat-{task_id[:8]}"):
            yield
    finally:
        try:
            client.delete(key)
        except Exception:  # noqa: BLE001, S110 - it expires by itself
            pass


class StepHeartbeats:
    """The heartbeats of the steps a worker process runs, started and stopped by Celery's signals."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._running: dict[str, Any] = {}

    def started(self, task_id: str) -> None:
        beat = step_heartbeat(self._settings, task_id)
        beat.__enter__()
        self._running[task_id] = beat

    def ended(self, task_id: str) -> None:
        beat = self._running.pop(task_id, None)
        if beat is not None:
            beat.__exit__(None, None, None)


def _held_by_live_workers(app: Any) -> set[str] | None:
    """Task ids the live workers report as active or reserved; None when none answered at all."""
    inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
    answered = False
    held: set[str] = set()
    for replies in (inspect.active(), inspect.reserved()):
        if replies is None:
            continue
        answered = True
        held |= {str(task.get("id")) for tasks in replies.values() for task in tasks}
    return held if answered else None


def _redis_broker(settings: Settings) -> tuple[str, Any] | None:
    """The broker's URL and this process's client for it; None when the broker is not Redis (no
    queues or `unacked` hash to look in)."""
    from lumikb_pipeline.infra import redis_client

    broker_url = redis_client.broker_url(settings)
    if not broker_url.startswith(("redis://", "rediss://", "unix://", "redis+socket://")):
        return None
    return broker_url, redis_client.shared_client(broker_url.replace("redis+socket://", "unix://", 1))


def requeue_lost_steps(settings: Settings, now: float | None = None, lost_after_s: float = LOST_AFTER_S) -> list[str]:
    """Put back in their queues the steps whose worker died; one line per step requeued."""
    from celery import Celery

    from lumikb_pipeline.infra import redis_client

    found = _redis_broker(settings)
    if found is None:
        return []
    broker_url, broker = found
    now = now if now is not None else time.time()
    old = cast(list[str], broker.zrangebyscore(UNACKED_INDEX_KEY, 0, now - lost_after_s))
    if not old:
        return []
    heartbeats = redis_client.connect(settings)
    candidates: dict[str, str] = {}
    for tag in old:
        raw = cast(str | None, broker.hget(UNACKED_KEY, tag))
        if raw is None:
            continue
        try:
            task_id = str(json.loads(raw)[0]["headers"]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if not heartbeats.exists(f"{HEARTBEAT_PREFIX}{task_id}"):
            candidates[tag] = task_id
    if not candidates:
        return []
    app = Celery(broker=broker_url, set_as_current=False)
    try:
        held = _held_by_live_workers(app)
        lost = {tag: task_id for tag, task_id in candidates.items() if held is None or task_id not in held}
        lines = []
        if lost:
            with app.connection_for_write() as connection:
                qos = connection.default_channel.qos
                for tag, task_id in lost.items():
                    qos.restore_by_tag(tag, leftmost=True)
                    lines.append(
                        f"step task {task_id}: its worker is gone (no heartbeat, not held by a live worker); "
                        "delivered again"
                    )
        return lines
    finally:
        app.close()


def _in_broker(broker: Any, task_id: str, queue: str) -> bool:
    """Whether a message of `task_id` waits in `queue` (any of kombu's priority lists of it) or is
    held unacknowledged by a worker."""
    for key in broker.scan_iter(match=f"{queue}*", count=100):
        if broker.type(key) == "list" and any(task_id in message for message in broker.lrange(key, 0, -1)):
            return True
    return any(task_id in raw for raw in cast(list[str], broker.hvals(UNACKED_KEY)))


def step_gone_from_broker(settings: Settings, task_id: str, queue: str) -> bool:
    """Whether the broker has lost the step `task_id` submitted to `queue`: no heartbeat, no message
    queued or unacknowledged, not held by a live worker. (Its result, the caller checks first.)
    False for a broker that is not Redis; raises when Redis does not answer."""
    from celery import Celery

    from lumikb_pipeline.infra import redis_client

    found = _redis_broker(settings)
    if found is None:
        return False
    broker_url, broker = found
    if redis_client.connect(settings).exists(f"{HEARTBEAT_PREFIX}{task_id}"):
        return False
    if _in_broker(broker, task_id, queue):
        return False
    app = Celery(broker=broker_url, set_as_current=False)
    try:
        held = _held_by_live_workers(app)
    finally:
        app.close()
    return held is None or task_id not in held
