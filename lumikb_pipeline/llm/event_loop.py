"""The process's one long-lived event loop for LLM calls, in a daemon thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")
# How much nicer than the rest of its process the LLM loop thread runs, where allowed (negative: it
# gets the CPU first).
LOOP_NICENESS = -10
_loop_lock = threading.Lock()
_loop: tuple[int, asyncio.AbstractEventLoop] | None = None


def run_in_loop_thread(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run `coro` on the process's long-lived LLM event loop (a daemon thread) and wait for it.

    One loop for the whole process, rather than `asyncio.run` per call, keeps LiteLLM's HTTP
    sessions and the warm-up alive between calls, and works whether or not the calling thread
    runs a loop of its own.
    """
    global _loop
    with _loop_lock:
        # A forked child (Celery prefork, multiprocessing) inherits the variable but not the thread.
        if _loop is None or _loop[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=_serve, args=(loop,), name="lumikb-llm-loop", daemon=True).start()
            _loop = (os.getpid(), loop)
        loop = _loop[1]
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    _run_before_batch_work()
    loop.run_forever()


def _run_before_batch_work() -> None:
    """Let the calling thread (the LLM loop) run before the machine's batch work, where allowed.

    The loop prepares every request before its rate slot and takes every answer: 10-30 ms of CPU a
    call, about half a core at 20 calls/s. On a machine it shares with Neo4j and the write steps, it
    got so little CPU while a batch was written that its requests reached the sender after their
    slots, which were given up: seconds without a call at the provider (docs/llm.md). At `nice` -10
    it gets about 9 times the share of a thread at 0; it only uses what its calls need. Allowed for
    root, with `CAP_SYS_NICE`, or with `RLIMIT_NICE` of 30 or more (docker-compose gives the workers
    `ulimits: nice: 30`); elsewhere the loop keeps its priority, without an error. Only this thread
    (Linux applies a thread id's niceness to that thread), and the threads it starts.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(-20, os.getpriority(os.PRIO_PROCESS, tid) + LOOP_NICENESS))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed
