"""A Celery step whose whole worker died is delivered again (`infra.lost_steps`), not after the
broker's visibility timeout; a step whose heartbeat is alive is left alone. Real Redis and kombu: a
consumer process takes messages without acknowledging them and is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import pytest
from kombu import Connection, Exchange, Queue

from lumikb_pipeline.core.config import Settings, get_settings, load_settings
from lumikb_pipeline.infra import redis_client
from lumikb_pipeline.infra.lost_steps import (
    HEARTBEAT_PREFIX,
    UNACKED_KEY,
    requeue_lost_steps,
    step_gone_from_broker,
    step_heartbeat,
)

QUEUE = "lost-steps-test"

TAKE_AND_HOLD = """
import sys, time
from kombu import Connection, Exchange, Queue
queue = Queue(sys.argv[2], Exchange(sys.argv[2]), routing_key=sys.argv[2])
with Connection(sys.argv[1]) as connection:
    channel = connection.channel()
    bound = queue(channel)
    for _ in range(int(sys.argv[3])):
        message = None
        while message is None:
            message = bound.get(no_ack=False)
    print("holding", flush=True)
    time.sleep(600)
"""


def _publish(url: str, task_ids: list[str]) -> None:
    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    with Connection(url) as connection:
        producer = connection.Producer()
        for task_id in task_ids:
            producer.publish({"step": task_id}, exchange=queue.exchange, routing_key=QUEUE, declare=[queue],
                             headers={"id": task_id, "task": "execute_plan"})


@pytest.fixture
def settings(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The pipeline's settings with the test Redis as its Redis and broker."""
    monkeypatch.setenv("LUMIKB_REDIS_URL", redis_url)
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)
    get_settings.cache_clear()
    return load_settings()


def _queued(url: str) -> int:
    import redis

    return int(redis.Redis.from_url(url).llen(QUEUE))


@pytest.mark.slow  # a real worker killed and its step redelivered: out of the fast step
def test_a_step_whose_worker_died_is_delivered_again_and_a_beating_one_is_not(
    redis_url: str, settings: Settings
) -> None:
    _publish(redis_url, ["task-lost", "task-beating"])
    worker = subprocess.Popen([sys.executable, "-c", TAKE_AND_HOLD, redis_url, QUEUE, "2"],
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == b"holding"
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert _queued(redis_url) == 0  # both held by a dead consumer, as after `kill -9` of a worker
    assert redis_client.connect(settings).hlen(UNACKED_KEY) == 2

    # Not old enough yet: nothing moves.
    assert requeue_lost_steps(settings, lost_after_s=60) == []
    with step_heartbeat(settings, "task-beating"):
        assert redis_client.connect(settings).exists(f"{HEARTBEAT_PREFIX}task-beating")
        lines = requeue_lost_steps(settings, now=time.time() + 1, lost_after_s=0)
    assert lines == ["step task task-lost: its worker is gone (no heartbeat, not held by a live worker); "
                     "delivered again"]
    assert _queued(redis_url) == 1
    assert redis_client.connect(settings).hlen(UNACKED_KEY) == 1  # the beating one stays where it is
    assert not redis_client.connect(settings).exists(f"{HEARTBEAT_PREFIX}task-beating")  # gone with its step


def _empty_queue_of_workers(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()  # Redis restarted without its data


@pytest.mark.slow  # seconds of real waiting: out of the fast step
def test_a_step_is_gone_from_the_broker_only_when_nothing_holds_it(redis_url: str, settings: Settings) -> None:
    _publish(redis_url, ["task-queued"])
    assert not step_gone_from_broker(settings, "task-queued", QUEUE)  # waiting in its queue
    _empty_queue_of_workers(redis_url)
    with step_heartbeat(settings, "task-queued"):
        assert not step_gone_from_broker(settings, "task-queued", QUEUE)  # a worker runs it
    assert step_gone_from_broker(settings, "task-queued", QUEUE)  # no message, no heartbeat, no worker


class _EventLog:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)


@pytest.mark.slow  # seconds of real waiting: out of the fast step
def test_a_watched_step_the_broker_lost_is_submitted_again(redis_url: str, settings: Settings) -> None:
    from celery import Celery

    from lumikb_pipeline.infra.executor import _WatchedStep

    app = Celery(broker=redis_url, backend=redis_url, set_as_current=False)
    log = _EventLog()
    try:
        step = _WatchedStep(lambda: app.send_task("execute_plan", queue=QUEUE), QUEUE, "extract", log,
                            gone_after_s=1.0, check_interval_s=0.2)
        first = step.result.id
        deadline = time.time() + 1.5
        while time.time() < deadline:  # queued, no worker yet: left alone
            assert not step.ready()
            time.sleep(0.2)
        assert step.result.id == first and log.warnings == [] and _queued(redis_url) == 1

        _empty_queue_of_workers(redis_url)
        deadline = time.time() + 30
        while step.result.id == first and time.time() < deadline:
            assert not step.ready()
            time.sleep(0.2)
        assert step.result.id != first
        assert _queued(redis_url) == 1  # its message is back in the queue, under a new task id
        assert len(log.warnings) == 1 and first in log.warnings[0] and step.result.id in log.warnings[0]

        app.backend.store_result(step.result.id, ["an event"], "SUCCESS")  # a worker ran it
        assert step.ready() and step.get() == ["an event"]
    finally:
        app.close()
