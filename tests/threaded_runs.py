"""`lowband train` with its workers as threads of the test process instead of spawned processes.

A spawned worker pays ~2.5 s of CPU before its first step (importing torch, then torch._dynamo at
its first optimizer step); a run of 3 workers on this 2-core machine spends ~4 s starting. Where a
test needs only a run's *numbers* (a fault-free reference loss, the bytes a technique counts), not
the process launch, `workers_as_threads()` swaps lowband.launch.launch_local for a launcher that
runs the very same `train_worker` on N threads over an in-process Gloo group (lowband.testing),
with the Comm built as launch_local builds it (link, seed). Everything else is the real CLI:
argument parsing, validation, the run folder, the summary. The numbers are bit for bit those of
the process launch (checked when this was written: DiLoCo, DDP, Streaming DiLoCo, NoLoCo, CO2,
SparseLoCo, and trimmed mean under a sign-flip attacker all gave identical final losses).

The process launch itself, and every fault that needs real processes (kill -9, SIGSTOP, restarts,
joins), stays covered by the tests that run it: this is only for references and byte counts.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Iterator

import torch

import lowband.launch
from lowband.comm import Comm
from lowband.comm.link import resolve_link
from lowband.testing import gloo_groups
from lowband.train.loop import train_worker


def _launch_threads(cfg, run, resume: bool, worker=train_worker) -> None:
    """launch_local's contract (cfg.workers workers, exceptions raised) on threads."""
    n = cfg.workers
    make = gloo_groups(n, timeout_s=300.0, prefix=f"threads-{id(run)}")
    errors: list[str] = []

    def body(rank: int) -> None:
        try:
            group = make(rank) if n > 1 else None
            link = resolve_link(cfg.link, getattr(cfg, "link_map", None))
            comm = Comm(group, link, seed=cfg.seed, device=torch.device("cpu"))
            worker(cfg, comm, run, torch.device("cpu"), resume=resume)
        except BaseException:  # noqa: BLE001 - re-raised below with the rank
            errors.append(f"rank {rank}:\n{traceback.format_exc()}")

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # what each spawned worker sets for itself
    try:
        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        if any(t.is_alive() for t in threads):
            raise TimeoutError("a threaded worker did not finish within 600 s")
    finally:
        torch.set_num_threads(before)
    if errors:
        raise RuntimeError("\n".join(errors))


@contextlib.contextmanager
def workers_as_threads() -> Iterator[None]:
    """Within the block, `lowband train` (non-elastic) runs its workers as threads (docstring)."""
    original = lowband.launch.launch_local
    lowband.launch.launch_local = _launch_threads  # cmd_train looks it up here at every call
    try:
        yield
    finally:
        lowband.launch.launch_local = original
