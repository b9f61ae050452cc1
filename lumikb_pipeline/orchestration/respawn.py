"""Keep one process running: start it again when it exits by itself, as docker-compose's
`restart: unless-stopped` does for the production containers (docker-compose.yml).

`lumikb up` runs each Celery worker under this:

    python -m lumikb_pipeline.orchestration.respawn -- celery -A ... worker ...

Why: a Celery worker does not always survive its broker. When Redis restarts, the worker's main
process can end with "Unrecoverable error: AttributeError: 'NoneType' object has no attribute
'hostname'" (celery 5.7, kombu 5.7: closing the lost connection, the Redis transport restores the
unacknowledged messages through a connection it has already dropped; see celery/kombu#582 for the
same trace), and nothing would start it again: the steps its children ran, submitted again by their
runs (`infra.executor`), would wait for a worker for good.

- The child runs in this process's group, so stopping or killing the group (`lumikb down`, a
  `SIGKILL` of the worker group, the host lost) takes both.
- `SIGTERM`, `SIGINT` and `SIGQUIT` are passed to the child (Celery's warm and cold shutdown) and
  this process then exits with the child's status: a stop is never answered with a restart.
- A child that exits by itself is started again after a back-off (`BACKOFF_S`, doubled after each
  quick exit up to `BACKOFF_MAX_S`). After `MAX_QUICK_EXITS` exits in a row, each within `QUICK_S`
  of its start (a crash loop: a bad configuration, a missing broker), it gives up and exits with
  the child's status, so that `lumikb up` reports the process as stopped.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

BACKOFF_S = 1.0
BACKOFF_MAX_S = 30.0
QUICK_S = 60.0
MAX_QUICK_EXITS = 5
PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def respawn_argv(argv: Sequence[str]) -> list[str]:
    """`argv` run under this module."""
    return [sys.executable, "-m", __name__, "--", *argv]


def _say(message: str) -> None:
    print(f"[respawn] {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], backoff_s: float = BACKOFF_S, quick_s: float = QUICK_S,
        max_quick_exits: int = MAX_QUICK_EXITS) -> int:
    """Run `argv` until it is stopped by a signal sent to this process or it crash-loops; returns
    the exit status to end with."""
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def pass_on(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in PASSED_ON:
        signal.signal(signum, pass_on)
    quick_exits = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(list(argv))
        status = child.wait()
        code = status if status >= 0 else 128 - status  # killed by signal N: 128 + N, as a shell says
        if stopping:
            return code
        quick_exits = quick_exits + 1 if time.monotonic() - started < quick_s else 0
        if quick_exits >= max_quick_exits:
            _say(f"{argv[0]} exited {quick_exits} times in a row within {quick_s:.0f} s of its start "
                 f"(last status {status}); not starting it again")
            return code
        delay = min(BACKOFF_MAX_S, backoff_s * 2 ** max(0, quick_exits - 1))
        _say(f"{argv[0]} exited by itself (status {status}); starting it again in {delay:.0f} s")
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return 0


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backoff-s", type=float, default=BACKOFF_S)
    parser.add_argument("--quick-s", type=float, default=QUICK_S)
    parser.add_argument("--max-quick-exits", type=int, default=MAX_QUICK_EXITS)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the command to keep running")
    options = parser.parse_args(args)
    argv = options.argv[1:] if options.argv[:1] == ["--"] else options.argv
    if not argv:
        parser.error("give the command to keep running after --")
    return run(argv, options.backoff_s, options.quick_s, options.max_quick_exits)


if __name__ == "__main__":
    sys.exit(main())
