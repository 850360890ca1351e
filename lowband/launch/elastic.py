"""Elastic training (lowband.fault.elastic): workers may die, restart and join while the job runs.

launch_elastic (`lowband train --elastic`) runs the job from this process:
1. Quiet torchft's per-quorum logging; find the Lighthouse (lighthouse.py) and open the event
   log RUN/metrics/events.jsonl (events.py).
2. Start a TCPStore: the first workers start together there, and the first to finish says so.
3. Serve admission for `lowband join` (admission.py).
4. Supervise the workers (supervisor.py) until the job is done; then close admission, the log
   and the Lighthouse, in that order (each also on an error).
5. Raise WorkerFailed if no worker finished; else merge the workers' summaries (summary.py).

join_job runs one newcomer worker in this process, after `lowband join` was admitted.
"""

from __future__ import annotations

import socket
from contextlib import closing

import torch
import torch.distributed as dist

from lowband.config import TrainConfig
from lowband.launch.admission import PAYLOAD, open_admission
from lowband.launch.events import EventLog
from lowband.launch.lighthouse import Lighthouse
from lowband.launch.summary import write_summary
from lowband.launch.supervisor import supervise
from lowband.launch.worker import quiet_torchft
from lowband.train.rundir import RunDir, check_fields


def launch_elastic(cfg: TrainConfig, run: RunDir, resume: bool = False) -> None:
    """cfg.workers local workers; dead ones restart up to --restarts (steps in the docstring).

    The job goes on while at least --min-workers are alive. With `resume` the first workers load
    the newest checkpoint; restarted and admitted workers heal from a live peer instead.
    """
    if resume:  # what the job reads back (metrics, the summaries merged at the end): a corrupt
        run.check_readable()  # file is refused now, before any is truncated, not after the job
    quiet_torchft()  # 1.
    with Lighthouse(cfg) as lighthouse, EventLog(run.path / "metrics" / "events.jsonl") as events:
        host = socket.gethostname()  # 2.
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        store_address = f"{host}:{store.port}"
        with closing(open_admission(cfg, run, lighthouse.address, store_address, events)):  # 3.
            outcome = supervise(cfg, run, lighthouse.address, store_address, events, resume)  # 4.
    outcome.raise_if_failed()  # 5.
    write_summary(cfg, run, outcome.finished, outcome.failed)


def join_job(payload: dict, device: str = "cpu") -> None:
    """Run one newcomer worker in this process (after `lowband join` was admitted)."""
    from lowband.train.loop import train_worker
    from lowband.train.session import Seat, elastic_worker

    check_fields("the admission server's answer", payload, PAYLOAD, {})
    cfg = TrainConfig.from_dict(payload["config"])
    torch.set_num_threads(cfg.threads)
    quiet_torchft()
    run = RunDir(payload["run"])
    seat = Seat(
        index=int(payload["index"]),
        lighthouse=payload["lighthouse"],
        joining=True,
        store=payload.get("store"),
    )
    comm, session = elastic_worker(cfg, run, seat)
    train_worker(cfg, comm, run, torch.device(device), session=session)
