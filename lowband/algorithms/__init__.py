"""One file per training algorithm. `ALGORITHMS` maps the CLI's --algo names to classes."""

from __future__ import annotations

import torch
from torch import nn

from lowband.algorithms.base import Algorithm
from lowband.algorithms.ddp import DDP
from lowband.algorithms.diloco import DiLoCo, StreamingDiLoCo
from lowband.comm import Comm
from lowband.config import TrainConfig
from lowband.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {
    "ddp": DDP,
    "diloco": DiLoCo,
    "streaming-diloco": StreamingDiLoCo,
}


def check_algo(name: str) -> None:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")


def check_algo_options(cfg: TrainConfig) -> None:
    """Reject impossible algorithm flags before any worker starts (one-line ConfigError)."""
    from lowband.comm import get_codec

    check_algo(cfg.algo)
    if cfg.algo != "streaming-diloco":
        for flag in ("fragments", "overlap"):
            if getattr(cfg, flag) is not None:
                raise ConfigError(f"--{flag} applies to --algo streaming-diloco only")
    if cfg.algo == "ddp":
        return
    if cfg.sync_every < 1:
        raise ConfigError(f"--sync-every must be at least 1, got {cfg.sync_every}")
    get_codec(cfg.bits or 32)
    if cfg.algo == "streaming-diloco":
        p = cfg.fragments if cfg.fragments is not None else 4
        tau = cfg.overlap if cfg.overlap is not None else 1
        if p < 1 or cfg.sync_every % p:
            raise ConfigError(
                f"--sync-every {cfg.sync_every} must be a multiple of --fragments {p}"
            )
        if tau < 0 or (tau > 0 and tau >= cfg.sync_every // p):
            raise ConfigError(
                f"--overlap {tau} must be below --sync-every/--fragments = {cfg.sync_every // p} "
                "(one fragment's reduction must land before the next one starts)"
            )
        if not 0.0 <= cfg.mix <= 1.0:
            raise ConfigError(f"--mix must be in [0, 1], got {cfg.mix}")


def build_algorithm(
    cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm
) -> Algorithm:
    """The algorithm named by cfg.algo, with its options taken from the config."""
    check_algo_options(cfg)
    if cfg.algo == "ddp":
        return DDP(model, optimizer, comm, bucket_mb=cfg.bucket_mb)
    outer = dict(
        sync_every=cfg.sync_every, outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum
    )
    if cfg.algo == "diloco":
        return DiLoCo(model, optimizer, comm, bits=cfg.bits or 32, **outer)
    return StreamingDiLoCo(
        model,
        optimizer,
        comm,
        fragments=cfg.fragments if cfg.fragments is not None else 4,
        overlap=cfg.overlap if cfg.overlap is not None else 1,
        mix=cfg.mix,
        bits=cfg.bits or 4,
        **outer,
    )


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DDP",
    "DiLoCo",
    "StreamingDiLoCo",
    "build_algorithm",
    "check_algo",
]
