"""Per-rank checkpoints with torch.save.

Why torch.save and not torch.distributed.checkpoint: in the algorithms lowband runs, workers hold
*different* states (DiLoCo's local parameters, per-worker inner optimizers), nothing is sharded,
and every rank's state must come back to exactly that rank. One file per rank, written to a
temporary name and renamed, with a sidecar holding its sha256, is simple, atomic and verifiable
before any process starts. (A sharded model would call for DCP; none is sharded here.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lowband.errors import CheckpointError
from lowband.train.rundir import RunDir, sha256_file, write_json_atomic


def save(
    run: RunDir, step: int, rank: int, world_size: int, fp: str, state: dict[str, Any]
) -> Path:
    d = run.step_dir(step)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank{rank}.pt"
    tmp = d / f".rank{rank}.pt.tmp"
    torch.save(
        {**state, "step": step, "rank": rank, "world_size": world_size, "fingerprint": fp}, tmp
    )
    os.replace(tmp, path)
    write_json_atomic(
        d / f"rank{rank}.json",
        {
            "step": step,
            "rank": rank,
            "world_size": world_size,
            "fingerprint": fp,
            "sha256": sha256_file(path),
        },
    )
    return path


def load(path: Path, rank: int, fp: str) -> dict[str, Any]:
    f = path / f"rank{rank}.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"cannot read checkpoint {f}: {type(e).__name__}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read checkpoint {f}: it holds no training state")
    if state.get("fingerprint") != fp or state.get("rank") != rank:
        raise CheckpointError(f"checkpoint {f} belongs to a different run or rank")
    return state
