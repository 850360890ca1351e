"""The elastic launcher's own record, RUN/metrics/events.jsonl, beside the workers' metrics.

One JSON line per event, {"event": KIND, "wall_time": seconds since the log opened, ...fields}:
admitted and admission_refused (from admission), worker_died, worker_restarted and
worker_stopped (from the supervisor). Lines are flushed as written, so a reader can follow a job
that is still running.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # line-buffered: one flush per event
        self._t_start = time.perf_counter()

    def write(self, kind: str, **fields: Any) -> None:
        wall_time = time.perf_counter() - self._t_start
        self._file.write(json.dumps({"event": kind, "wall_time": wall_time, **fields}) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
