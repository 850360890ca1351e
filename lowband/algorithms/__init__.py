"""One file per training algorithm, each written once against a sync group (lowband.comm.sync).

`ALGORITHMS` maps the CLI's --algo names to classes; an algorithm registers itself by defining
`name` (lowband.algorithms.registry, which imports every module of this package). How to add one:
docs/architecture.md.
"""

from __future__ import annotations

from lowband.algorithms.base import Algorithm
from lowband.algorithms.ddp import DDP  # (import order = the order --help lists them)

from lowband.algorithms.diloco import DiLoCo, StreamingDiLoCo  # isort: skip
from lowband.algorithms.noloco import NoLoCo  # isort: skip
from lowband.algorithms.co2 import CO2  # isort: skip
from lowband.algorithms.coded import CodedDDP  # isort: skip
from lowband.algorithms.registry import ALGORITHMS, Setup, build, check, discover, get

build_algorithm = build
"""The algorithm a TrainConfig names, on a Comm or a SyncGroup (registry.build)."""

discover()

__all__ = [
    "ALGORITHMS",
    "CO2",
    "NoLoCo",
    "Algorithm",
    "CodedDDP",
    "DDP",
    "DiLoCo",
    "Setup",
    "StreamingDiLoCo",
    "build",
    "build_algorithm",
    "check",
    "get",
]
