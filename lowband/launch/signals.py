"""Stopping cleanly: SIGTERM and SIGHUP like Ctrl-C in the launcher, and no orphaned workers.

A scheduler, `kill` or a container stop sends SIGTERM (a closed terminal SIGHUP) to the launcher's
PID alone. `stop_on_signals()` turns them into `Stopped`, a KeyboardInterrupt, so the launcher's
own clean-up runs exactly as for Ctrl-C: its workers are stopped, the last complete checkpoint
stays, one line says how to resume, and the exit code is 128 + the signal's number.

A worker started by a launcher calls `exit_with_parent()`: a daemon thread that ends the worker
when its launcher is gone (killed by SIGKILL, which nothing can catch), instead of leaving it to
train on alone and write into the run folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """The launcher received SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Stopped in the main thread (elsewhere: no-op)."""

    def raise_stopped(signum, _frame):
        raise Stopped(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, raise_stopped) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_with_parent(poll_s: float = 0.5) -> None:
    """End this process (exit code 1) as soon as the process that started it is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: the launcher died
                os._exit(1)

    threading.Thread(target=watch, name="lowband-parent-watch", daemon=True).start()
