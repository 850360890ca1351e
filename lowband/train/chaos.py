"""Fault injection for tests and benchmarks: --fail-at, --stall-at, --throttle-at.

Each fires on one worker right after one training step, so a test can put a fault exactly where it
wants it (a sync step, mid-way between syncs) and the run stays reproducible:

  --fail-at RANK:STEP[,...]        the worker kills itself with SIGKILL (as `kill -9` would: no
                                   cleanup, no flush beyond what is already written)
  --stall-at RANK:STEP:SECONDS     the worker stops itself with SIGSTOP; a detached `sleep; kill
                                   -CONT` wakes it SECONDS later (heartbeats stop too, as for a
                                   frozen host)
  --throttle-at RANK:STEP:FACTOR   the worker's emulated link gets FACTOR times less bandwidth
  --kill-joiner SECONDS[,...]      (elastic) the k-th restart of a worker SIGKILLs itself that long
                                   after it joined: mid-quorum or mid-heal

A worker restarted after a crash (elastic, --restarts) does not fire the first three again.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field

from lowband.config import TrainConfig
from lowband.errors import ConfigError


@dataclass
class Chaos:
    kills: set[tuple[int, int]] = field(default_factory=set)
    stalls: dict[tuple[int, int], float] = field(default_factory=dict)
    throttles: dict[tuple[int, int], float] = field(default_factory=dict)
    joiner_kills: list[float] = field(default_factory=list)
    """--kill-joiner: seconds after joining at which the k-th restart of a worker kills itself."""

    def __bool__(self) -> bool:
        return bool(self.kills or self.stalls or self.throttles)


def _items(flag: str, value: str | None, arity: int, workers: int) -> list[tuple[int, int, float]]:
    if not value:
        return []
    shape = "RANK:STEP" if arity == 2 else f"RANK:STEP:{'SECONDS' if 'stall' in flag else 'FACTOR'}"
    out = []
    for item in value.split(","):
        parts = item.strip().split(":")
        try:
            if len(parts) != arity:
                raise ValueError
            rank, step = int(parts[0]), int(parts[1])
            extra = float(parts[2]) if arity == 3 else 0.0
        except ValueError:
            raise ConfigError(f"{flag} takes {shape}[,{shape}...], got {value!r}") from None
        if not 0 <= rank < workers or step < 1 or (arity == 3 and not extra > 0):
            raise ConfigError(
                f"{flag} {item!r}: RANK must be below --workers ({workers}), STEP at least 1"
                + (", and the last field positive" if arity == 3 else "")
            )
        out.append((rank, step, extra))
    return out


def parse_chaos(cfg: TrainConfig) -> Chaos:
    """The faults the config asks for; raises ConfigError (one line) on a malformed flag."""
    chaos = Chaos()
    for r, s, _ in _items("--fail-at", cfg.fail_at, 2, cfg.workers):
        chaos.kills.add((r, s))
    for r, s, secs in _items("--stall-at", cfg.stall_at, 3, cfg.workers):
        chaos.stalls[(r, s)] = secs
    for r, s, factor in _items("--throttle-at", cfg.throttle_at, 3, cfg.workers):
        chaos.throttles[(r, s)] = factor
    if cfg.kill_joiner:
        try:
            chaos.joiner_kills = [float(x) for x in cfg.kill_joiner.split(",")]
        except ValueError:
            raise ConfigError(
                f"--kill-joiner takes SECONDS[,SECONDS...], got {cfg.kill_joiner!r}"
            ) from None
        if not all(0 <= x < 3600 for x in chaos.joiner_kills):
            raise ConfigError(
                f"--kill-joiner: each delay must be in [0, 3600) s, got {cfg.kill_joiner}"
            )
    if chaos.throttles and not cfg.link:
        raise ConfigError("--throttle-at slows the emulated link: give --link too")
    return chaos


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def stall_self(seconds: float) -> None:
    """SIGSTOP this process; a detached shell sends SIGCONT after `seconds`."""
    pid = os.getpid()
    subprocess.Popen(
        ["sh", "-c", f"sleep {seconds}; kill -CONT {pid}"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.kill(pid, signal.SIGSTOP)
