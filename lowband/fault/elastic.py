"""Elastic membership on torchft: quorum per sync, live recovery, commit or discard.

One `Membership` per worker process. Every worker is its own torchft *replica group* (one
process, group rank 0, group world size 1): a torchft `Manager` heartbeats to the job's
`Lighthouse`, asks it for a quorum at every synchronisation point, and reconfigures a torchft
`ProcessGroupGloo` over whoever is in it. lowband's algorithms then run their ordinary reductions
through a `lowband.comm.Comm` built on that group (so bytes are counted and the link emulated as
always), and ask `commit()` before applying the result. docs/torchft.md describes torchft's
pieces; docs/fault.md how lowband uses them.

The life of one synchronisation (DDP: every step; DiLoCo: every H steps; Streaming: every H/P):

  1. `quorum()` blocks until the Lighthouse has a quorum (every live replica that heartbeats,
     waiting up to the join timeout for stragglers). A replica whose committed step is behind the
     quorum's maximum *heals*: it downloads a live peer's whole training state (model, inner and
     outer optimizer, global parameters, loop step, sampler position = the step) over torchft's
     checkpoint transport and loads it through the loop's callback before `quorum()` returns.
  2. The algorithm reduces over the returned Comm. A replica that has just healed contributes
     zeros and the sum is divided by the number of contributing replicas (exchanged once per
     new quorum), so a newcomer neither doubles its source's update nor dilutes the average.
  3. `commit()`: torchft's `should_commit` (no error seen on this replica since the quorum, and
     at least `min_workers` participants). True: apply the update; the committed step counter
     advances. False: discard it (the algorithm resets to the last global state); a replica
     that fell behind this way heals at its next quorum.

Errors. Any exception in a reduction (a peer died: Gloo reports a closed connection; a peer hung:
the group's timeout fires) is passed to `report_error`, so the step is not committed and the next
quorum rebuilds the group without the dead peer (the Lighthouse drops a replica whose heartbeat
is older than its heartbeat timeout). Nothing ever waits forever: every wait has a timeout
(`--timeout` for collectives and state transfer, `--quorum-timeout` for a quorum).

Newcomers. A worker started with `--join` (or restarted after a crash) asks for a quorum at once,
before any training step; its committed step is 0 while the job's is at least 1 (the original
workers start at step 1: "the initial state exists"), so it always heals, then takes part in the
synchronisation its peers are doing and continues from their step with its own data shard.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from lowband.comm import Comm, CommStats, LinkSpec
from lowband.comm.accounting import Traffic
from lowband.errors import ConfigError, LowbandError

log = logging.getLogger("lowband.fault")


def _torchft():
    try:
        import torchft  # noqa: F401
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo
    except ImportError as e:  # pragma: no cover - torchft is a dependency of --elastic
        raise ConfigError(
            "--elastic needs torchft: pip install torchft==0.2.0 (or `pip install lowband[elastic]`)"
        ) from e
    return Manager, ProcessGroupGloo


def start_lighthouse(
    min_workers: int,
    *,
    bind: str = "[::]:0",
    join_timeout_s: float = 60.0,
    heartbeat_timeout_s: float = 5.0,
):
    """A torchft Lighthouse in this process; `.address()` is what workers connect to."""
    _torchft()
    from torchft.coordination import LighthouseServer

    return LighthouseServer(
        bind=bind,
        min_replicas=min_workers,
        join_timeout_ms=int(join_timeout_s * 1000),
        quorum_tick_ms=50,
        heartbeat_timeout_ms=int(heartbeat_timeout_s * 1000),
    )


def _link_transport(timeout: datetime.timedelta, owner: Membership):
    """torchft's HTTP checkpoint transport, timed, with the download charged to the emulated link.

    The state travels over loopback on one host; `recv_checkpoint` then sleeps for what is left
    of the link's ideal time for those bytes (two latency hops: request and response), so a
    recovery costs on the wall clock what it would cost over the emulated wide-area link.
    """
    from torchft.checkpointing.http_transport import HTTPTransport

    class LinkHTTPTransport(HTTPTransport):
        def recv_checkpoint(self, src_rank, metadata, step, timeout):
            t0 = time.perf_counter()
            state = super().recv_checkpoint(src_rank, metadata, step, timeout)
            nbytes = _nbytes(state)
            if owner.link is not None:
                remaining = owner.link.ideal_time(nbytes, 2) - (time.perf_counter() - t0)
                if remaining > 0:
                    time.sleep(remaining)
            seconds = time.perf_counter() - t0
            owner.stats.add("recovery", Traffic(0, nbytes, nbytes, 2), seconds=seconds)
            owner.last_transfer = (nbytes, seconds)
            return state

    return LinkHTTPTransport(timeout=timeout, num_chunks=0)


class JobFinished(LowbandError):
    """The job finished while this worker was behind (e.g. stopped): it leaves, it does not go on alone."""


class JobStateLost(LowbandError):
    """A newcomer found no live worker holding the job's state: every one that had it is gone."""


class Membership:
    """This worker's seat in an elastic job (module docstring)."""

    def __init__(
        self,
        *,
        replica_id: str,
        lighthouse: str,
        min_workers: int,
        state_dict: Callable[[], dict[str, Any]],
        load_state_dict: Callable[[dict[str, Any]], None],
        link: LinkSpec | None,
        stats: CommStats,
        seed: int = 0,
        hostname: str = "localhost",
        timeout_s: float = 60.0,
        quorum_timeout_s: float = 600.0,
        joining: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        Manager, ProcessGroupGloo = _torchft()
        import torch.distributed as dist

        self.replica_id = replica_id
        self.link, self.stats, self.seed = link, stats, seed
        self.on_event = on_event
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.quorum_timeout = datetime.timedelta(seconds=quorum_timeout_s)
        self._user_state_dict, self._user_load = state_dict, load_state_dict
        self.store = dist.TCPStore(hostname, 0, is_master=True, wait_for_workers=False)
        self.pg = ProcessGroupGloo(timeout=self.timeout)
        self.manager = Manager(
            pg=self.pg,
            load_state_dict=self._load,
            state_dict=self._state_dict,
            min_replica_size=min_workers,
            use_async_quorum=False,
            timeout=self.timeout,
            quorum_timeout=self.quorum_timeout,
            connect_timeout=self.timeout,
            rank=0,
            world_size=1,
            store_addr=hostname,
            store_port=self.store.port,
            lighthouse_addr=lighthouse,
            replica_id=replica_id,
            hostname=hostname,
            init_sync=False,
            checkpoint_transport=_link_transport(self.timeout, self),
        )
        self.joining = joining
        if not joining:  # the initial state exists: a newcomer (step 0) will always heal from us
            self.manager.load_state_dict({"step": 1, "batches_committed": 0})
        self.comm = Comm(None, link, stats=stats, seed=seed)
        self.job_finished: Callable[[], bool] = lambda: False
        """Set by the launcher's worker: True once the first worker has finished the run."""
        self.healed = False
        """Set by a quorum in which this worker loaded a peer's state; the caller clears it."""
        self.contributors = 1
        self.quorum_seconds = 0.0
        self.last_transfer: tuple[int, float] = (0, 0.0)
        """(bytes, seconds) of the last state download, emulated link included."""
        self.last_load_s = 0.0
        self._quorum_id: int | None = None
        self._rank_of_quorum: tuple[int, int] | None = None

    # -- torchft callbacks ----------------------------------------------------------------------
    def _state_dict(self) -> dict[str, Any]:
        # Called on a live peer when a newcomer must heal from it: the state goes out over
        # torchft's checkpoint transport (HTTP), outside the process group, so count it here.
        state = self._user_state_dict()
        nbytes = _nbytes(state)
        self.stats.add("recovery", Traffic(nbytes, 0, nbytes, 0), seconds=0.0)
        return state

    def _load(self, state: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self._user_load(state)
        self.last_load_s = time.perf_counter() - t0
        self.healed = True

    # -- one synchronisation --------------------------------------------------------------------
    def quorum(self) -> Comm:
        """Block until a quorum exists; heal if behind; return the Comm to reduce over."""
        t0 = time.perf_counter()
        if self.job_finished():
            raise JobFinished(f"{self.replica_id}: the job finished while this worker was behind")
        for attempt in range(3):
            try:
                self.manager.start_quorum(timeout=self.quorum_timeout)
                break
            except Exception as e:  # noqa: BLE001 - a quorum that failed (peer gone mid-setup)
                log.warning("%s: quorum failed (%s), retrying", self.replica_id, e)
                if attempt == 2:
                    raise
        healed_now = self.healed
        if self.joining and not healed_now:
            # Every worker in the quorum is a newcomer (step 0): the workers that held the
            # job's state are all gone, and an elastic job keeps it nowhere else.
            raise JobStateLost(
                "no live worker holds the job's state any more (every worker that had it died "
                "before a newcomer could heal from it); start a new run"
            )
        self.joining = False
        quorum_id = self.manager._quorum_id  # torchft exposes no getter; read-only use
        if quorum_id != self._quorum_id:
            self._quorum_id = quorum_id
            self.comm = Comm(self.pg.parent, self.link, stats=self.stats, seed=self.seed)
            # How many replicas contribute (have not just healed): one small all-reduce, only
            # when the quorum changed (the same decision on every member: a heal always comes
            # with a new quorum, torchft bumps its id on a join or a commit failure). A failure
            # here fails the step like any other.
            count = torch.tensor([0.0 if healed_now else 1.0])
            try:
                self.comm.all_reduce(count)
                self.contributors = max(1, int(count.item()))
            except Exception as e:  # noqa: BLE001
                self.report_error(e)
                self.contributors = 1
        else:  # the same members as last time, none of them healing: everybody contributes
            self.contributors = self.comm.size
        seconds = time.perf_counter() - t0
        self.quorum_seconds += seconds
        if healed_now and self.on_event is not None:
            self.on_event(
                {
                    "event": "recovered",
                    "replica": self.replica_id,
                    "seconds": seconds,
                    "bytes": self.last_transfer[0],
                    "transfer_s": self.last_transfer[1],
                    "load_s": self.last_load_s,
                    "ideal_transfer_s": (
                        self.link.ideal_time(self.last_transfer[0], 2) if self.link else 0.0
                    ),
                    "participants": self.comm.size,
                }
            )
        return self.comm

    def throttle(self, factor: float) -> None:
        """Divide this worker's emulated bandwidth by `factor` (fault injection: --throttle-at)."""
        if self.link is None:
            return
        self.link = dataclasses.replace(self.link, bandwidth_bps=self.link.bandwidth_bps / factor)
        self.comm.link = self.link
        if self.on_event is not None:
            self.on_event({"event": "throttled", "replica": self.replica_id, "factor": factor})

    def report_error(self, e: BaseException) -> None:
        log.warning("%s: step failed: %s", self.replica_id, str(e).splitlines()[0] if str(e) else e)
        self.manager.report_error(e if isinstance(e, Exception) else RuntimeError(str(e)))

    def commit(self) -> bool:
        try:
            return bool(self.manager.should_commit(timeout=self.timeout))
        except Exception as e:  # noqa: BLE001 - too many failures in a row, or the server died
            log.warning("%s: commit failed: %s", self.replica_id, e)
            return False

    @property
    def step(self) -> int:
        """Committed synchronisations (torchft's step; the original workers start at 1)."""
        return self.manager.current_step()

    def shutdown(self) -> None:
        try:
            self.manager.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0
