"""Keeping an elastic job's worker processes going until the job is done.

1. Start cfg.workers processes, indices 0..N-1 (with resume they load the newest checkpoint).
2. Every 50 ms, look at each. Exit 0 means finished; once one has finished, the others get
   --timeout + --join-timeout to finish too, then are killed (worker_stopped).
3. A worker that died (worker_died) starts again under its index as a joiner that heals from a
   live peer (worker_restarted), while --restarts remain, none has finished and the job's state
   is not lost. Exit code 3 (JobStateLost) means no live worker holds that state: restarting
   cannot help, so it ends the job instead of looping.
4. When none is left, drain the error queue. Outcome.raise_if_failed says how the job ended.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from dataclasses import dataclass

from lowband.config import TrainConfig
from lowband.launch.events import EventLog
from lowband.launch.failures import WorkerFailed, worker_messages
from lowband.launch.worker import elastic_worker_main
from lowband.train.rundir import RunDir


@dataclass
class Outcome:
    finished: set[int]
    """Indices of the workers that exited 0."""
    failed: dict[int, int]
    """Index -> exit code of the workers that were not restarted (-9: killed after the finish)."""
    lost: bool
    """Some worker exited with JobStateLost."""
    messages: dict[int, tuple[int, str]]
    """What the workers put on the error queue: index -> (code, message)."""

    def raise_if_failed(self) -> None:
        """WorkerFailed unless some worker finished the job."""
        if self.finished:
            return
        failed, messages = self.failed, self.messages
        if self.lost:
            text = next((m for c, m in messages.values() if c == 3), "the job's state was lost")
            raise WorkerFailed(min(failed) if failed else 0, 1, text)
        r = min(failed) if failed else 0
        detail = messages.get(r, (1, f"exited with code {failed.get(r)}"))[1]
        raise WorkerFailed(r, 1, f"every worker failed; worker {r}: {detail}")


def supervise(
    cfg: TrainConfig,
    run: RunDir,
    lighthouse: str,
    store: str,
    events: EventLog,
    resume: bool = False,
) -> Outcome:
    """Steps 1-4 of the module docstring."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()

    def spawn(index: int, joining: bool, resume: bool = False) -> mp.process.BaseProcess:
        p = ctx.Process(
            target=elastic_worker_main,
            args=(index, cfg.to_dict(), str(run.path), lighthouse, joining, store, errors, resume),
            name=f"lowband-worker-{index}",
        )
        p.start()
        return p

    procs = {i: spawn(i, joining=False, resume=resume) for i in range(cfg.workers)}  # 1.
    restarts_left = cfg.restarts
    finished: set[int] = set()
    failed: dict[int, int] = {}
    give_up_at = math.inf  # once a worker has finished, the others get this long to finish too
    lost = False  # every worker that held the job's state died (JobStateLost)
    try:
        while procs:
            time.sleep(0.05)  # 2.
            if time.monotonic() > give_up_at:
                for i, p in procs.items():
                    p.kill()
                    reason = "still running long after the job finished"
                    events.write("worker_stopped", index=i, reason=reason)
                    failed[i] = -9
                procs.clear()
                break
            for i, p in list(procs.items()):
                if p.exitcode is None:
                    continue
                del procs[i]
                if p.exitcode == 0:
                    finished.add(i)
                    give_up_at = min(give_up_at, time.monotonic() + cfg.timeout + cfg.join_timeout)
                    continue
                events.write("worker_died", index=i, exitcode=p.exitcode)  # 3.
                if p.exitcode == 3:  # JobStateLost: restarting cannot help
                    lost = True
                if restarts_left > 0 and not finished and not lost:
                    restarts_left -= 1
                    events.write("worker_restarted", index=i)
                    procs[i] = spawn(i, joining=True)
                else:
                    failed[i] = p.exitcode
    finally:
        for p in procs.values():
            p.kill()
    return Outcome(finished, failed, lost, worker_messages(errors))  # 4.
