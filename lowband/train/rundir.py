"""The run folder: what a run leaves on disk, and the rules that keep it from being overwritten.

runs/NAME/
  config.json          the resolved TrainConfig
  meta.json            versions, machine, corpus hash, git commit, parameter count
  metrics/rankR.jsonl  one JSON line per logged step and worker
  ckpt/step_SSSSSSS/   rankR.pt plus rankR.json (its sha256); complete when every rank's .json is there
  summary.json         final figures, written by rank 0 at the end
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowband.config import TrainConfig
from lowband.errors import CheckpointError, RunDirError

# Fields that change how a run is observed but not what it computes: a resume may differ in them.
_OBSERVATION_FIELDS = {
    "eval_every",
    "eval_batches",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "fail_at",
    "threads",
}


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg: TrainConfig, corpus_sha256: str) -> str:
    """What a checkpoint must agree with to be resumed: the config (less observation fields) and the data."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _OBSERVATION_FIELDS}
    d["corpus_sha256"] = corpus_sha256
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    world_size: int
    fingerprint: str


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    meta_path = property(lambda self: self.path / "meta.json")
    metrics_dir = property(lambda self: self.path / "metrics")
    ckpt_dir = property(lambda self: self.path / "ckpt")
    summary_path = property(lambda self: self.path / "summary.json")

    def metrics_path(self, rank: int) -> Path:
        return self.metrics_dir / f"rank{rank}.jsonl"

    # -- creating and reopening -----------------------------------------------------------------
    def check_new(self) -> None:
        """Refuse an out folder that already holds something: nothing on disk is ever overwritten."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a folder")
        if self.config_path.exists():
            raise RunDirError(
                f"{self.path} already holds a run; continue it with --resume {self.path}, or choose another --out"
            )
        if any(self.path.iterdir()):
            raise RunDirError(
                f"{self.path} is not empty and not a lowband run; choose another --out"
            )

    def create(self, cfg: TrainConfig) -> None:
        self.check_new()
        try:
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            write_json_atomic(self.config_path, cfg.to_dict())
        except OSError as e:  # read-only, below a file, no space: one line, not a traceback
            raise RunDirError(
                f"cannot create the run folder {self.path}: {e.strerror or e}"
            ) from None

    def load_config(self) -> TrainConfig:
        if not self.config_path.exists():
            raise RunDirError(f"--resume {self.path}: not a lowband run folder (no config.json)")
        try:
            return TrainConfig.from_dict(json.loads(self.config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise RunDirError(f"--resume {self.path}: config.json is unreadable ({e})") from None

    # -- checkpoints ----------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.ckpt_dir / f"step_{step:07d}"

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first (complete: every rank wrote its sidecar)."""
        found = []
        if not self.ckpt_dir.exists():
            return found
        for d in sorted(self.ckpt_dir.iterdir()):
            m = re.fullmatch(r"step_(\d+)", d.name)
            if not m or not (d / "rank0.json").exists():
                continue
            try:
                head = json.loads((d / "rank0.json").read_text())
            except json.JSONDecodeError:
                continue
            world = int(head.get("world_size", 0))
            if world and all((d / f"rank{r}.json").exists() for r in range(world)):
                found.append(Checkpoint(int(m.group(1)), d, world, head.get("fingerprint", "")))
        return found

    def verify_checkpoint(
        self, ckpt: Checkpoint, expected_fingerprint: str, world_size: int
    ) -> None:
        """Raise CheckpointError unless every rank's file is intact and belongs to this run."""
        if ckpt.fingerprint != expected_fingerprint:
            raise CheckpointError(
                f"checkpoint {ckpt.path} belongs to a different run (fingerprint {ckpt.fingerprint} != {expected_fingerprint})"
            )
        if ckpt.world_size != world_size:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written by {ckpt.world_size} workers, this run has {world_size}"
            )
        for r in range(ckpt.world_size):
            side = json.loads((ckpt.path / f"rank{r}.json").read_text())
            f = ckpt.path / f"rank{r}.pt"
            if not f.exists() or sha256_file(f) != side.get("sha256"):
                raise CheckpointError(
                    f"checkpoint file {f} is missing or corrupt (sha256 mismatch)"
                )

    def prune_checkpoints(self, keep: int) -> None:
        complete = self.checkpoints()
        if keep < 1 or len(complete) <= keep:
            return
        newest_kept = complete[-keep].step
        for d in self.ckpt_dir.iterdir():
            m = re.fullmatch(r"step_(\d+)", d.name)
            if m and int(m.group(1)) < newest_kept:
                shutil.rmtree(d, ignore_errors=True)

    # -- metrics --------------------------------------------------------------------------------
    def truncate_metrics(self, rank: int, after_step: int) -> None:
        """Drop lines past a checkpoint: the resumed run recomputes those steps."""
        path = self.metrics_path(rank)
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= after_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a crash
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def default_run_name(cfg: TrainConfig) -> str:
    return f"runs/{cfg.algo}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
