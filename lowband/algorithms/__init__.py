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


def build_algorithm(
    cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm
) -> Algorithm:
    """The algorithm named by cfg.algo, with its options taken from the config."""
    check_algo(cfg.algo)
    if cfg.algo != "streaming-diloco":
        for flag in ("fragments", "overlap"):
            if getattr(cfg, flag) is not None:
                raise ConfigError(f"--{flag} applies to --algo streaming-diloco only")
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
