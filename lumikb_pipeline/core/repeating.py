"""A call repeated on a background thread while a block runs (heartbeats)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def repeating(action: Callable[[], object], interval_s: float, name: str) -> Iterator[None]:
    """Call `action` every `interval_s` on a daemon thread named `name` until the block ends. A call
    that raises (a storage or network hiccup) is left to the next one to make good."""
    stop = threading.Event()

    def repeat() -> None:
        while not stop.wait(interval_s):
            try:
                action()
            except Exception:  # noqa: BLE001, S112 - the next call tries again
                continue

    thread = threading.Thread(target=repeat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
