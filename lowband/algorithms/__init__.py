"""One file per training algorithm. `ALGORITHMS` maps the CLI's --algo names to classes."""

from __future__ import annotations

import torch
from torch import nn

from lowband.algorithms.base import Algorithm
from lowband.algorithms.ddp import DDP
from lowband.comm import Comm
from lowband.config import TrainConfig
from lowband.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {"ddp": DDP}


def check_algo(name: str) -> None:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")


def build_algorithm(
    cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm
) -> Algorithm:
    """The algorithm named by cfg.algo, with its options taken from the config."""
    check_algo(cfg.algo)
    if cfg.algo == "ddp":
        return DDP(model, optimizer, comm, bucket_mb=cfg.bucket_mb)
    raise AssertionError(cfg.algo)


__all__ = ["ALGORITHMS", "Algorithm", "DDP", "build_algorithm", "check_algo"]
