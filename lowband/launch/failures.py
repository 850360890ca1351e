"""How a launcher reports a worker that failed: one WorkerFailed, from the workers' error queue.

A worker process that fails puts (index, code, message) on a multiprocessing queue before it
exits: code 2 is bad input (a LowbandError, whose message says it all), 3 the elastic job's state
lost (JobStateLost), 1 anything else. Once its workers are gone the parent drains the queue and
raises one WorkerFailed for the root cause, which the CLI prints in a line.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.queues import Queue


class WorkerFailed(Exception):
    """Worker `rank` failed; `exitcode` is what the CLI exits with (2 for bad input, else 1)."""

    def __init__(self, rank: int, exitcode: int, message: str) -> None:
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


def worker_messages(errors: Queue) -> dict[int, tuple[int, str]]:
    """What the workers put on the error queue; bad input found inside one is raised as such."""
    messages: dict[int, tuple[int, str]] = {}
    try:
        while True:
            r, code, msg = errors.get(timeout=0.2)
            messages[r] = (code, msg)
    except queue.Empty:
        pass
    for r, (code, msg) in sorted(messages.items()):
        if code == 2:
            raise WorkerFailed(r, 2, msg)
    return messages
