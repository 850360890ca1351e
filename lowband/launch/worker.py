"""What runs inside one elastic worker process, with torchft's logging kept to what matters.

The worker's exit code tells the supervisor what happened: 0 finished, 3 the job's state is lost
(JobStateLost: no live worker holds it, so a restart cannot help), 2 bad input (LowbandError),
1 anything else. The message goes on the error queue for the launcher's one-line report.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from typing import TYPE_CHECKING

import torch

from lowband.config import TrainConfig
from lowband.errors import LowbandError
from lowband.fault.elastic import JobStateLost
from lowband.train.rundir import RunDir

if TYPE_CHECKING:
    from multiprocessing.queues import Queue


def quiet_torchft() -> None:
    """torchft logs every quorum at INFO (Rust and Python): keep its warnings and errors only."""
    os.environ.setdefault("RUST_LOG", "warn")
    logging.getLogger("torchft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")


def elastic_worker_main(
    index: int,
    cfg_dict: dict,
    run_path: str,
    lighthouse: str,
    joining: bool,
    store: str,
    errors: Queue,
    resume: bool,
) -> None:
    """Train as worker `index` of the elastic job; never returns (see the module docstring)."""
    from lowband.launch.signals import exit_with_parent
    from lowband.train.loop import train_worker
    from lowband.train.session import Seat, elastic_worker

    exit_with_parent()
    cfg = TrainConfig.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads)
    quiet_torchft()
    try:
        run = RunDir(run_path)
        seat = Seat(index=index, lighthouse=lighthouse, joining=joining, store=store)
        comm, session = elastic_worker(cfg, run, seat)
        train_worker(cfg, comm, run, torch.device("cpu"), resume=resume, session=session)
    except JobStateLost as e:
        errors.put((index, 3, str(e)))
        sys.exit(3)
    except LowbandError as e:
        errors.put((index, 2, str(e)))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        errors.put((index, 1, f"{type(e).__name__}: {e}".splitlines()[0]))
        sys.exit(1)
    # torchft's threads (heartbeats, gRPC) can keep a finished interpreter alive: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
