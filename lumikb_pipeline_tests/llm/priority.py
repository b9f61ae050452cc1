"""Whether this process may change a thread's scheduling, asked the way the code under test does."""

from __future__ import annotations

import threading
from collections.abc import Callable


def allowed_in_a_new_thread(change: Callable[[], None]) -> bool:
    """Run `change` (a scheduling change of the calling thread) in a throwaway thread: True when it
    did not raise `OSError` (root, `CAP_SYS_NICE` or the matching rlimit), False when refused."""
    allowed: list[bool] = []

    def probe() -> None:
        try:
            change()
            allowed.append(True)
        except OSError:
            allowed.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return allowed[0]
