"""The live progress line on rank 0: step, tokens/s, loss, bytes sent, ETA.

On a terminal it is a rich progress bar; elsewhere (CI, pipes, log files) a plain line at every
10% so logs stay short.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lowband.comm.accounting import format_bytes


class ProgressBar:
    def __init__(self, total: int, start: int, description: str, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self._t0, self._s0 = time.perf_counter(), start
        self._next_print = start + max(1, total // 10)
        self._progress: Progress | None = None
        if enabled and self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task(
                description, total=total, completed=start, stats=""
            )
            self._progress.start()
        elif enabled:
            print(f"{description}: {total} steps", file=sys.stderr, flush=True)

    def update(
        self,
        step: int,
        *,
        tokens_per_s: float,
        loss: float,
        mb_sent: float | None = None,
        eval_loss: float | None = None,
        bytes_sent: float | None = None,
        exposed_comm_s: float = 0.0,
        extra: dict | None = None,
    ) -> None:
        if not self.enabled:
            return
        stats = f"{tokens_per_s:,.0f} tok/s"
        if loss == loss:  # the loss is read only on logged steps: nothing to show before the first
            stats += f"  loss {loss:.3f}"
        if eval_loss is not None:
            stats += f"  eval {eval_loss:.3f}"
        if bytes_sent is None:  # the older keyword, in megabytes
            bytes_sent = round((mb_sent or 0.0) * 1e6)
        stats += f"  sent {format_bytes(bytes_sent)}"
        stats += f"  comm {exposed_comm_s:,.1f}s"
        extra = extra or {}
        if "outer_step" in extra:
            stats += f"  outer {extra['outer_step']}"
        if extra.get("peak_sync_bytes"):
            stats += f"  peak/sync {format_bytes(extra['peak_sync_bytes'])}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif step >= self._next_print or step == self.total:
            elapsed = time.perf_counter() - self._t0
            done = step - self._s0
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(
                f"  step {step}/{self.total}  {stats}  eta {eta:.0f}s", file=sys.stderr, flush=True
            )
            self._next_print = step + max(1, self.total // 10)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
