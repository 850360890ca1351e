"""One file per training algorithm. `ALGORITHMS` maps the CLI's --algo names to classes."""

from __future__ import annotations

import torch
from torch import nn

from lowband.algorithms.base import Algorithm
from lowband.algorithms.co2 import CO2
from lowband.algorithms.coded import CodedDDP
from lowband.algorithms.ddp import DDP
from lowband.algorithms.diloco import DiLoCo, StreamingDiLoCo
from lowband.algorithms.noloco import NoLoCo
from lowband.algorithms.robust import (
    build_code,
    build_injector,
    build_reducer,
    check_robust_options,
    gathers_updates,
    label_flip_classes,
)
from lowband.comm import Comm
from lowband.config import TrainConfig
from lowband.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {
    "ddp": DDP,
    "diloco": DiLoCo,
    "streaming-diloco": StreamingDiLoCo,
    "noloco": NoLoCo,
    "co2": CO2,
}


def check_algo(name: str) -> None:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")


def check_algo_options(cfg: TrainConfig) -> None:
    """Reject impossible algorithm flags before any worker starts (one-line ConfigError)."""
    from lowband.comm import get_codec

    check_algo(cfg.algo)
    check_robust_options(cfg)
    only = {
        "fragments": "streaming-diloco",
        "overlap": "streaming-diloco",
        "group_size": "noloco",
        "co2_delay": "co2",
        "co2_lambda": "co2",
        "co2_clip": "co2",
        "co2_gap_penalty": "co2",
    }
    for flag, algo in only.items():
        if getattr(cfg, flag) is not None and cfg.algo != algo:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --algo {algo} only")
    if cfg.algo == "ddp":
        for flag in ("outer_lr", "outer_momentum", "bits"):
            if getattr(cfg, flag) is not None:
                if flag == "bits" and gathers_updates(cfg):
                    continue  # the all-gathered gradients travel at --bits
                raise ConfigError(f"--{flag.replace('_', '-')} does not apply to --algo ddp")
        get_codec(cfg.bits or 32)
        return
    if cfg.sync_every < 1:
        raise ConfigError(f"--sync-every must be at least 1, got {cfg.sync_every}")
    get_codec(cfg.bits or 32)
    if cfg.algo == "noloco" and cfg.group_size is not None and cfg.group_size < 2:
        raise ConfigError(f"--group-size must be at least 2, got {cfg.group_size}")
    if cfg.algo == "co2":
        if cfg.co2_delay not in (None, 0, 1):
            raise ConfigError(f"--co2-delay must be 0 or 1, got {cfg.co2_delay}")
        if cfg.co2_lambda is not None and not cfg.co2_lambda > 0:
            raise ConfigError(f"--co2-lambda must be positive, got {cfg.co2_lambda}")
        if cfg.co2_clip is not None and cfg.co2_clip < 0:
            raise ConfigError(f"--co2-clip must be 0 (off) or positive, got {cfg.co2_clip}")
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
    if cfg.elastic:
        return _build_elastic(cfg, model, optimizer, comm)
    algo = _build(cfg, model, optimizer, comm)
    algo.flip_labels = label_flip_classes(cfg, model, comm.rank, comm.size)
    return algo


def _build(
    cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, comm: Comm
) -> Algorithm:
    from lowband.comm import get_codec

    injector = build_injector(cfg, comm.size)
    if cfg.algo == "ddp" and cfg.stragglers > 0:
        code = build_code(cfg, comm.size)
        return CodedDDP(model, optimizer, comm, code=code, injector=injector)
    if cfg.algo == "ddp":
        reducer = build_reducer(cfg, comm, get_codec(cfg.bits or 32))
        return DDP(
            model, optimizer, comm, bucket_mb=cfg.bucket_mb, reducer=reducer, injector=injector
        )
    if cfg.algo == "noloco":
        return NoLoCo(model, optimizer, comm, **_noloco_options(cfg))
    if cfg.algo == "co2":
        return CO2(model, optimizer, comm, **_co2_options(cfg))
    outer = dict(
        sync_every=cfg.sync_every,
        outer_lr=_or(cfg.outer_lr, 0.7),
        outer_momentum=_or(cfg.outer_momentum, 0.9),
    )
    if cfg.algo == "diloco":
        reducer = build_reducer(cfg, comm, get_codec(cfg.bits or 32))
        return DiLoCo(model, optimizer, comm, bits=cfg.bits or 32, reducer=reducer, **outer)
    return StreamingDiLoCo(
        model,
        optimizer,
        comm,
        fragments=cfg.fragments if cfg.fragments is not None else 4,
        overlap=cfg.overlap if cfg.overlap is not None else 1,
        mix=cfg.mix,
        bits=cfg.bits or 4,
        reducer=build_reducer(cfg, comm, get_codec(cfg.bits or 4)),
        **outer,
    )


def _or(value, default):
    return value if value is not None else default


def _noloco_options(cfg: TrainConfig) -> dict:
    return dict(
        sync_every=cfg.sync_every,
        group_size=_or(cfg.group_size, 2),
        gamma=_or(cfg.outer_lr, 0.7),
        beta=_or(cfg.outer_momentum, 0.5),
        bits=cfg.bits or 32,
        seed=cfg.seed,
    )


def _co2_options(cfg: TrainConfig) -> dict:
    return dict(
        sync_every=cfg.sync_every,
        outer_lr=_or(cfg.outer_lr, 1.0),
        beta=_or(cfg.outer_momentum, 0.5),
        lam=_or(cfg.co2_lambda, 1.0),
        clip=_or(cfg.co2_clip, 1.0),
        delay=_or(cfg.co2_delay, 1),
        gap_penalty=bool(cfg.co2_gap_penalty),
        bits=cfg.bits or 32,
    )


def _build_elastic(cfg, model, optimizer, comm) -> Algorithm:
    from lowband.algorithms.elastic import (
        ElasticCO2,
        ElasticDDP,
        ElasticNoLoCo,
        ElasticStreamingDiLoCo,
    )

    if cfg.algo == "ddp":
        return ElasticDDP(model, optimizer, comm, bucket_mb=cfg.bucket_mb)
    if cfg.algo == "noloco":
        return ElasticNoLoCo(model, optimizer, comm, **_noloco_options(cfg))
    if cfg.algo == "co2":
        return ElasticCO2(model, optimizer, comm, **_co2_options(cfg))
    streaming = cfg.algo == "streaming-diloco"
    return ElasticStreamingDiLoCo(
        model,
        optimizer,
        comm,
        sync_every=cfg.sync_every,
        fragments=(cfg.fragments if cfg.fragments is not None else 4) if streaming else 1,
        overlap=(cfg.overlap if cfg.overlap is not None else 1) if streaming else 0,
        mix=cfg.mix if streaming else 0.0,
        bits=cfg.bits or (4 if streaming else 32),
        outer_lr=cfg.outer_lr if cfg.outer_lr is not None else 0.7,
        outer_momentum=cfg.outer_momentum if cfg.outer_momentum is not None else 0.9,
    )


__all__ = [
    "ALGORITHMS",
    "CO2",
    "NoLoCo",
    "Algorithm",
    "CodedDDP",
    "DDP",
    "DiLoCo",
    "StreamingDiLoCo",
    "build_algorithm",
    "check_algo",
]
