"""N local worker processes that rendezvous over TCP on 127.0.0.1: Gloo on CPU, NCCL on GPUs.

`lowband train --workers N` (and `lowband finetune`):
1. The parent validates what it can first (pick_device), so bad input fails in one line before
   any process starts. One worker runs in this process, with no process group at all.
2. Otherwise it spawns N processes on a free port; each joins the group, runs the worker, and
   meets the others at a barrier before tearing the group down (shutdown_group).
3. The parent watches them. The first to exit non-zero is the root cause: the others are stopped
   (they would only fail later on the lost peer) and WorkerFailed says which one and why.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lowband.comm import Comm
from lowband.comm.link import resolve_link
from lowband.config import TrainConfig
from lowband.errors import ConfigError, LowbandError
from lowband.launch.failures import WorkerFailed, worker_messages
from lowband.launch.signals import exit_with_parent
from lowband.train.loop import train_worker
from lowband.train.rundir import RunDir

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective may wait for a peer before the process group gives up."""


def pick_device(cfg: TrainConfig, local_workers: int) -> str:
    """'cuda' when asked (several workers share a GPU when there are fewer GPUs than workers:
    gpu_of) or (auto) when every local worker can have a GPU of its own; else 'cpu'."""
    have = gpu_count()
    if cfg.device == "cpu":
        return "cpu"
    if cfg.device == "cuda":
        if have == 0:
            raise ConfigError("--device cuda needs a GPU, and this machine has none")
        return "cuda"
    if cfg.device != "auto":
        raise ConfigError(f"unknown --device {cfg.device!r}; choose cpu, cuda or auto")
    return "cuda" if have >= local_workers and have > 0 else "cpu"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_of(rank: int, workers: int, gpus: int) -> tuple[int, str]:
    """(GPU index, backend) of local worker `rank` of `workers` on `gpus` GPUs: one GPU each over
    NCCL when there are enough; otherwise round-robin, several workers to a GPU, over Gloo
    (NCCL refuses two ranks on one device; Gloo moves GPU tensors through host copies,
    lowband.comm.Comm.stage_on_host). The run's meta.json and report then say that wall-clock
    reflects the sharing."""
    return rank % gpus, "nccl" if gpus >= workers else "gloo"


def shutdown_group() -> None:
    # Tearing down a Gloo group while a peer is still inside its last collective can abort the
    # process ("terminate called without an active exception"): meet at a barrier first.
    dist.barrier()
    dist.destroy_process_group()


def launch_local(cfg: TrainConfig, run: RunDir, resume: bool, worker=train_worker) -> None:
    """Run `worker(cfg, comm, run, device, resume=...)` on cfg.workers local processes (train's
    loop by default; `lowband finetune` passes lowband.zo.loop.finetune_worker and its config)."""
    n = cfg.workers
    device_kind = pick_device(cfg, n)
    if n == 1:
        torch.set_num_threads(cfg.threads)
        device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
        worker(
            cfg,
            Comm(None, resolve_link(cfg.link, getattr(cfg, "link_map", None))),
            run,
            device,
            resume=resume,
        )
        return
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    args = (n, port, cfg.to_dict(), str(run.path), resume, device_kind, errors, worker, type(cfg))
    procs = [
        ctx.Process(target=_worker_main, args=(r, *args), name=f"lowband-worker-{r}")
        for r in range(n)
    ]
    for p in procs:
        p.start()
    first_failed: list[tuple[int, int]] = []  # the workers found dead first: the root cause
    try:
        while any(p.is_alive() for p in procs):
            first_failed = [
                (r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)
            ]
            if first_failed:
                break
            time.sleep(0.05)
        for p in procs:
            p.join(timeout=2.0)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
    failed = first_failed or [
        (r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (0, None)
    ]
    if not failed:
        return
    messages = worker_messages(errors)
    r, code = failed[0]
    detail = messages[r][1] if r in messages else f"exited with code {code}"
    raise WorkerFailed(r, 1, f"worker {r} failed ({detail}); the other workers were stopped")


def _worker_main(
    rank: int,
    world: int,
    port: int,
    cfg_dict: dict,
    run_path: str,
    resume: bool,
    device_kind: str,
    errors: Queue,
    worker: Callable,
    cfg_cls: type,
) -> None:
    """One spawned worker (step 2); exits 2 on bad input, 1 on anything else."""
    exit_with_parent()
    cfg = cfg_cls.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads)
    try:
        backend = "gloo"
        device = torch.device("cpu")
        if device_kind == "cuda":
            gpu, backend = gpu_of(rank, world, gpu_count())
            torch.cuda.set_device(gpu)
            device = torch.device("cuda", gpu)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=TIMEOUT,
            **({"device_id": device} if backend == "nccl" else {}),
        )
        comm_device = device if backend == "nccl" else torch.device("cpu")  # its control tensors
        comm = Comm(
            dist.group.WORLD,
            resolve_link(cfg.link, getattr(cfg, "link_map", None)),
            seed=cfg.seed,
            device=comm_device,
        )
        worker(cfg, comm, RunDir(run_path), device, resume=resume)
        shutdown_group()
    except LowbandError as e:
        errors.put((rank, 2, str(e)))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - a bug or a lost peer
        if not _lost_peer(e):  # a peer's death is reported by the parent; a bug keeps its traceback
            traceback.print_exc()
        errors.put((rank, 1, f"{type(e).__name__}: {e}".splitlines()[0]))
        sys.exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lost_peer(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "Connection reset" in text or "Connection closed" in text
    )
