"""Under torchrun this process is one worker: the rendezvous comes from the environment.

torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the process group is NCCL on GPUs,
Gloo otherwise. The same command scales to many hosts (the run folder should then be on a shared
filesystem, for checkpoints).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from lowband.comm import Comm
from lowband.comm.link import resolve_link
from lowband.config import TrainConfig
from lowband.launch.local import TIMEOUT, shutdown_group
from lowband.train.loop import train_worker
from lowband.train.rundir import RunDir


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def launch_torchrun(cfg: TrainConfig, run_path: Path, resume: bool, worker=train_worker) -> None:
    """This process is one worker of a torchrun job (running `worker`, as in launch_local)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    comm = Comm(
        dist.group.WORLD,
        resolve_link(cfg.link, getattr(cfg, "link_map", None)),
        seed=cfg.seed,
        device=device,
    )
    worker(cfg, comm, RunDir(run_path), device, resume=resume)
    shutdown_group()
