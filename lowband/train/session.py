"""How one worker takes part in a job: its sync group, start, events, checkpoints and summary.

The loop (lowband.train.loop) asks a session, never a membership:

  * `group`: the sync group its algorithm is built on (lowband.comm.sync);
  * `attach(state, events)`: where its events go, and, in an elastic job, the training state a
    newcomer downloads from this worker (and how this worker loads a peer's);
  * `shard(sp)`: which data this worker draws; `checkpoint_slot()`: whether and as which file it
    writes a checkpoint; `after_step(step)`: injected faults;
  * `running()`: the block that trains (an elastic worker that finds the job finished leaves it);
  * `finish(...)`: the run's summary.

`LocalSession` is a static job (local processes or torchrun): a fixed group, rank and world.
`ElasticSession` is a worker of `lowband train --elastic` (lowband.fault.elastic): its seat (a
fixed index, its data shard and metrics file) outlives any quorum; a newcomer heals at its first
round; its summary goes to a file the launcher merges, since the group may have changed.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lowband.comm import Comm, LinkSpec
from lowband.comm.sync import StaticGroup, SyncGroup
from lowband.config import TrainConfig
from lowband.train.chaos import Chaos, kill_self, parse_chaos, stall_self
from lowband.train.rundir import RunDir, write_json_atomic

EventSink = Callable[[dict[str, Any]], None]


@dataclass
class Seat:
    """An elastic worker's place in the job (lowband.fault.elastic): fixed for its lifetime."""

    index: int
    """The worker's number: its metrics file and data shard (index % --workers)."""
    lighthouse: str
    joining: bool = False
    """True for a newcomer or a restarted worker: it heals from a live peer before training."""
    store: str | None = None
    """HOST:PORT of the launcher's TCPStore: the first workers start together there, and the
    first worker to finish says so there (a worker still behind then leaves instead of going on
    alone)."""


class LocalSession:
    """A static job: local processes on one host, or torchrun across hosts."""

    def __init__(self, cfg: TrainConfig, comm: Comm, chaos: Chaos | None = None) -> None:
        self.comm, self.stats = comm, comm.stats
        self.index, self.world = comm.rank, comm.size
        self._events: EventSink | None = None
        self.group: SyncGroup = StaticGroup(comm, on_event=lambda e: self.event(e))
        self.chaos = chaos if chaos is not None else parse_chaos(cfg)
        self.fresh = True
        """Whether this worker starts the run (it writes meta.json) rather than joining it."""

    def attach(self, state: Any, events: EventSink) -> None:
        self._events = events

    def event(self, event: dict[str, Any]) -> None:
        if self._events is not None:
            self._events(event)

    def shard(self, sp: Any) -> tuple[int, int, int]:
        """(shard, shards, seed offset) of this worker's data: one shard per data-parallel group."""
        return sp.dp_rank, sp.dp_size, 0

    def checkpoint_slot(self) -> tuple[int, int] | None:
        """(rank, world size) of this worker's file in a checkpoint: every rank writes its own."""
        return self.index, self.world

    def checkpoint_extra(self) -> dict[str, Any]:
        """What the session adds to a checkpoint."""
        return {}

    def resumed(self, saved: dict[str, Any]) -> None:
        """This worker has just loaded the checkpoint `saved`."""

    def after_step(self, step: int, before_kill: Callable[[], None]) -> None:
        """Faults injected after `step` (--fail-at, --stall-at, --throttle-at)."""
        if (self.index, step) in self.chaos.kills:
            before_kill()
            kill_self()  # injected fault: SIGKILL, no cleanup, as `kill -9` would
        if (self.index, step) in self.chaos.stalls:
            stall_self(self.chaos.stalls[(self.index, step)])
        if (self.index, step) in self.chaos.throttles:
            self.throttle(self.chaos.throttles[(self.index, step)])

    def throttle(self, factor: float) -> None:
        raise NotImplementedError("--throttle-at needs --elastic")  # refused by the CLI first

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        yield

    @property
    def left(self) -> bool:
        return False

    def finish(
        self, row: list[float], summarise: Callable[[torch.Tensor], dict], details: dict
    ) -> dict:
        """All-gather every worker's totals (a few numbers, counted as 'summary' traffic); rank 0
        writes summary.json through `summarise(table)`. Returns the summary on every rank."""
        mine = torch.tensor(row, dtype=torch.float64, device=self.comm.device)
        rows = [torch.empty_like(mine) for _ in range(self.comm.size)]
        self.comm.all_gather(rows, mine)
        return summarise(torch.stack(rows).cpu())

    def close(self) -> None:
        pass


class ElasticSession(LocalSession):
    """A worker of an elastic job (module docstring)."""

    def __init__(self, cfg: TrainConfig, seat: Seat, comm: Comm, run: RunDir) -> None:
        from lowband.fault.elastic import ElasticGroup

        chaos = parse_chaos(cfg)  # a restart fires only --kill-joiner, never the others again
        super().__init__(
            cfg, comm, Chaos(joiner_kills=chaos.joiner_kills) if seat.joining else chaos
        )
        self.seat, self.run, self.cfg = seat, run, cfg
        self.index, self.world = seat.index, cfg.workers
        self.fresh = not seat.joining
        self.group = self.elastic = ElasticGroup(
            index=seat.index,
            lighthouse=seat.lighthouse,
            min_workers=cfg.min_workers,
            link=LinkSpec.parse(cfg.link),
            stats=comm.stats,
            seed=cfg.seed,
            timeout_s=cfg.timeout,
            quorum_timeout_s=cfg.quorum_timeout,
            joining=seat.joining,
            on_event=lambda e: self.event(e),
            parity_every=cfg.parity_every,
            detect_every=cfg.detect_every,
        )
        self._store = _job_store(seat.store, cfg.quorum_timeout) if seat.store else None
        if self._store is not None:
            self.elastic.job_finished = lambda: self._store.check(["lowband/finished"])
        self._left = False

    def attach(self, state: Any, events: EventSink) -> None:
        super().attach(state, events)
        self.elastic.register_state(state.state_dict, state.load_state_dict)
        if self.seat.joining:
            state.algo.joining = True  # its first round heals it
            self._kill_if_asked()
            self.event({"event": "joined", "replica": self.elastic.replica_id})
        elif self._store is not None:
            _start_together(self._store, self.cfg.workers, self.cfg.quorum_timeout)

    def _kill_if_asked(self) -> None:
        """--kill-joiner: the k-th restart of this worker (k = the `joined` events its metrics
        file already holds) kills itself after the k-th delay, wherever its join then is."""
        delays = self.chaos.joiner_kills
        path = self.run.metrics_path(self.index)
        k = path.read_text().count('"event": "joined"') if path.exists() else 0
        if k < len(delays):
            timer = threading.Timer(delays[k], kill_self)
            timer.daemon = True
            timer.start()

    def shard(self, sp: Any) -> tuple[int, int, int]:
        # A worker beyond --workers shares a shard, not its batches.
        return self.index % self.world, self.world, 7919 * (self.index // self.world)

    def checkpoint_slot(self) -> tuple[int, int] | None:
        """The worker that is rank 0 of its last committed quorum writes the job's one state."""
        if self.group.comm.rank != 0 or not self.elastic.last_committed:
            return None
        return 0, 1

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"committed": self.elastic.step}

    def resumed(self, saved: dict[str, Any]) -> None:
        # The job's committed rounds go on counting from the checkpoint's.
        self.elastic.restore_step(int(saved.get("committed", 1)))

    def throttle(self, factor: float) -> None:
        self.elastic.throttle(factor)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        from lowband.fault.elastic import JobFinished

        try:
            yield
        except JobFinished:
            self._left = True
            self.event({"event": "left", "reason": "the job finished while this worker was behind"})

    @property
    def left(self) -> bool:
        return self._left

    def finish(
        self, row: list[float], summarise: Callable[[torch.Tensor], dict], details: dict
    ) -> dict:
        """No collective over a group that may have changed: this worker's totals go to a file
        the launcher merges (lowband.launch), and the first to finish says so in the store."""
        if self._left:
            return {}
        if self._store is not None:
            self._store.set("lowband/finished", "1")
        write_json_atomic(
            self.run.path / "summaries" / f"rank{self.index}.json",
            {"row": row, **details},
        )
        return {}

    def close(self) -> None:
        self.elastic.shutdown()


def _job_store(address: str, timeout_s: float):
    import torch.distributed as dist

    host, port = address.rsplit(":", 1)
    return dist.TCPStore(
        host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _start_together(store, workers: int, timeout_s: float) -> None:
    """Wait until every first worker heartbeats to the Lighthouse, so the first quorum has them
    all (otherwise the quickest would start alone and the others would heal from it)."""
    store.add("lowband/ready", 1)
    deadline = time.monotonic() + timeout_s
    while store.add("lowband/ready", 0) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the first {workers} workers did not all start in {timeout_s:g}s")
        time.sleep(0.05)


def elastic_worker(cfg: TrainConfig, run: RunDir, seat: Seat) -> tuple[Comm, ElasticSession]:
    """A worker's (Comm, session) in an elastic job: the Comm only carries its byte counters and
    link, every round gets its quorum's Comm from the session's sync group."""
    comm = Comm(None, LinkSpec.parse(cfg.link), seed=cfg.seed)
    return comm, ElasticSession(cfg, seat, comm, run)


__all__ = ["Seat", "LocalSession", "ElasticSession", "elastic_worker"]
