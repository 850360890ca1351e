"""Where an elastic job's torchft Lighthouse comes from: the user's, or one in this process.

The Lighthouse forms the quorums (which workers are in each step). With --lighthouse HOST:PORT
the job uses that one (several jobs, or one that outlives this launcher); otherwise the launcher
starts one for the job's lifetime, requiring --min-workers in a quorum.

The user's address is checked first (`check_lighthouse_flag`, also from `lowband train`'s
validation, before the run folder exists): a malformed URL, or an address where no Lighthouse
answers within lowband.fault.elastic.LIGHTHOUSE_TIMEOUT_S (5 s), is one line, not a hang.
"""

from __future__ import annotations

from typing import Any

from lowband.config import TrainConfig
from lowband.fault.elastic import check_lighthouse, start_lighthouse


def check_lighthouse_flag(cfg: TrainConfig) -> None:
    """ConfigError unless --lighthouse, when given with --elastic, is a Lighthouse that answers."""
    if cfg.elastic and cfg.lighthouse:
        check_lighthouse(cfg.lighthouse)


class Lighthouse:
    """The job's Lighthouse: `.address` is what workers connect to; close() stops ours, if any."""

    def __init__(self, cfg: TrainConfig) -> None:
        self._server: Any = None
        if cfg.lighthouse:
            check_lighthouse(cfg.lighthouse)
            self.address: str = cfg.lighthouse
            return
        self._server = start_lighthouse(
            cfg.min_workers,
            join_timeout_s=cfg.join_timeout,
            heartbeat_timeout_s=cfg.heartbeat_timeout,
        )
        self.address = self._server.address()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Lighthouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
