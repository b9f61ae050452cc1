"""The process's one long-lived event loop for LLM calls, in a daemon thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")
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
            threading.Thread(target=loop.run_forever, name="lumikb-llm-loop", daemon=True).start()
            _loop = (os.getpid(), loop)
        loop = _loop[1]
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
