"""The elastic sync group on torchft: a quorum per round, live recovery, commit or roll back.

`ElasticGroup` is the `lowband.comm.sync.SyncGroup` of `lowband train --elastic`: the algorithms
are the same classes as in a static run, only their group differs. One group per worker process.
Every worker is its own torchft *replica group* (one process, group rank 0, group world size 1): a
torchft `Manager` heartbeats to the job's `Lighthouse`, asks it for a quorum at every round, and
reconfigures a torchft `ProcessGroupGloo` over whoever is in it. The reductions then run through a
`lowband.comm.Comm` on that group (bytes counted and the link emulated as always).
docs/torchft.md describes torchft's pieces; docs/elastic.md how lowband uses them.

The life of one round (DDP: every step; DiLoCo: every H steps; Streaming: every H/P):

  1. `begin()` blocks until the Lighthouse has a quorum (every live replica that heartbeats,
     waiting up to the join timeout for stragglers). A replica whose committed step is behind the
     quorum's maximum *heals*: it downloads a live peer's whole training state (registered with
     `register_state`, torchft's register_state_dict_fn) over torchft's checkpoint transport and
     loads it before `begin()` returns. On a new quorum the members exchange (worker index,
     healed?) in one small all-gather, so everybody knows who contributes.
  2. The algorithm reduces over the returned Comm. A replica that has just healed contributes
     zeros (`scale` = 0) and the others are scaled by participants / contributors, so a newcomer
     neither doubles its source's update nor dilutes the average. Errors go to `report()`.
  3. `commit()`: torchft's should_commit (no error on any replica since the quorum, and at least
     `min_workers` participants). True: the algorithm applies its update and calls `committed()`,
     which checks bit-parity of the shared state over the quorum (lowband.fault.parity) and every
     so often exchanges collective timings (lowband.fault.detector). False: the algorithm rolls
     the round back and calls `discarded()`; a replica that fell behind heals at its next quorum.

From your own loop (examples/elastic_own_loop.py; torchft's names in brackets):

    group = ElasticGroup(index=i,                        # [replica_id = f"replica_{i}"]
                         lighthouse="http://host:29510",  # [lighthouse_addr]
                         min_workers=1,                   # [min_replica_size]
                         joining=restarted)               # a newcomer heals before it trains
    algo = lowband.DiLoCo(model, opt, group, sync_every=100)
    group.register_state(state_dict, load_state_dict)    # [register_state_dict_fn]
    if restarted:
        algo.join()                                       # heal, then take part in the round

Nothing waits forever: every wait has a timeout (`--timeout` for collectives and state transfer,
`--quorum-timeout` for a quorum). A newcomer (`joining=True`) asks for a quorum before any step;
its committed step is 0 while the job's is at least 1 (the first workers start at step 1: "the
initial state exists"), so it always heals; if nobody can heal it, `JobStateLost`.
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
from lowband.comm.sync import EventSink, SyncGroup
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


LIGHTHOUSE_TIMEOUT_S = 5.0
"""How long `check_lighthouse` waits for a Lighthouse to connect and answer before giving up."""


def check_lighthouse(address: str, timeout_s: float = LIGHTHOUSE_TIMEOUT_S) -> None:
    """ConfigError, in one line and within about `timeout_s` seconds, unless `address` is an
    http(s)://HOST:PORT URL at which a torchft Lighthouse answers.

    torchft itself would wait its connect timeout (--timeout, 60 s by default) and then fail with
    a traceback, or, at a port that accepts connections but never answers, wait for a quorum until
    --quorum-timeout. The check asks for the Lighthouse's status page (plain HTTP, no proxy): a
    malformed address, a refused connection, silence and an answer from something else are each
    one line.
    """
    import http.client
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        url = urllib.parse.urlsplit(address)
        port = url.port
    except ValueError:
        url, port = None, None
    if url is None or url.scheme not in ("http", "https") or not url.hostname or port is None:
        host, _, port_text = address.rpartition(":")
        bare = "://" not in address and host and port_text.isdigit()  # HOST:PORT
        hint = f"; did you mean http://{address}?" if bare else ""
        raise ConfigError(
            f"--lighthouse {address!r} is not a Lighthouse URL: expected http://HOST:PORT{hint}"
        )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    where = f"--lighthouse {address}"
    try:
        with opener.open(f"{url.scheme}://{url.netloc}/status", timeout=timeout_s) as reply:
            body = reply.read(1 << 16)
    except urllib.error.HTTPError as e:  # an HTTP server, but one without a Lighthouse's page
        raise ConfigError(f"{where} answers HTTP {e.code}: not a torchft Lighthouse") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise ConfigError(f"{where} did not answer within {timeout_s:g}s") from None
        reason = getattr(e.reason, "strerror", None) or e.reason
        raise ConfigError(f"{where}: nothing answers there ({reason})") from None
    except TimeoutError:
        raise ConfigError(f"{where} did not answer within {timeout_s:g}s") from None
    except (OSError, http.client.HTTPException) as e:
        raise ConfigError(f"{where}: no Lighthouse answers there ({type(e).__name__})") from None
    if b"quorum" not in body.lower():
        raise ConfigError(f"{where} answers, but not as a torchft Lighthouse")


def _link_transport(timeout: datetime.timedelta, owner: ElasticGroup):
    """torchft's HTTP checkpoint transport, timed, with the download charged to the emulated link.

    The state travels over loopback on one host; `recv_checkpoint` then sleeps for what is left
    of the link's ideal time for those bytes (two latency hops: request and response), so a
    recovery costs on the wall clock what it would cost over the emulated wide-area link. Its
    server writes no access-log line per transfer (only this server's handler is changed).
    """
    from torchft.checkpointing.http_transport import HTTPTransport

    class LinkHTTPTransport(HTTPTransport):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            handler = self._server.RequestHandlerClass
            self._server.RequestHandlerClass = type(
                "QuietHandler", (handler,), {"log_message": lambda *_: None}
            )

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


class HealFailed(RuntimeError):
    """A newcomer's download of a live peer's state failed (its source died or hung): it exits
    like any failed worker (a restart may try again), the others go on."""


class ElasticGroup(SyncGroup):
    """This worker's seat in an elastic job, as a sync group (module docstring)."""

    elastic = True

    def __init__(
        self,
        *,
        index: int,
        lighthouse: str,
        min_workers: int = 1,
        link: LinkSpec | None = None,
        stats: CommStats | None = None,
        seed: int = 0,
        hostname: str = "localhost",
        timeout_s: float = 60.0,
        quorum_timeout_s: float = 600.0,
        joining: bool = False,
        on_event: EventSink | None = None,
        parity_every: int = 1,
        detect_every: int = 10,
    ) -> None:
        Manager, ProcessGroupGloo = _torchft()
        import torch.distributed as dist

        from lowband.fault.detector import Detector

        self.index = index
        self.replica_id = f"replica_{index}"
        self.link, self.seed = link, seed
        self.stats = stats if stats is not None else CommStats()
        self._on_event = on_event
        self.parity_every, self.detect_every = parity_every, detect_every
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.quorum_timeout = datetime.timedelta(seconds=quorum_timeout_s)
        self.store = dist.TCPStore(hostname, 0, is_master=True, wait_for_workers=False)
        self.pg = ProcessGroupGloo(timeout=self.timeout)
        self.manager = Manager(
            pg=self.pg,
            load_state_dict=None,
            state_dict=None,
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
            replica_id=self.replica_id,
            hostname=hostname,
            init_sync=False,
            checkpoint_transport=_link_transport(self.timeout, self),
        )
        self.joining = joining
        if not joining:  # the initial state exists: a newcomer (step 0) will always heal from us
            self.manager.load_state_dict({"step": 1, "batches_committed": 0})
        self.comm = Comm(None, link, stats=self.stats, seed=seed)
        # Every participant computes the same slow-rank verdict; only the flagged one logs it.
        self.detector = Detector(
            self.comm,
            on_event=lambda e: self.event(e) if e.get("rank") == self.comm.rank else None,
        )
        self.job_finished: Callable[[], bool] = lambda: False
        """Set by the session: True once the first worker has finished the run."""
        self.healed = False
        """True in a round whose quorum loaded a peer's state into this worker."""
        self.contributors = 1
        self._members: list[int] = [index]
        self._contributing: list[bool] = [True]
        self.quorum_seconds = 0.0
        self.last_transfer: tuple[int, float] = (0, 0.0)
        """(bytes, seconds) of the last state download, emulated link included."""
        self.last_load_s = 0.0
        self.failed_syncs = 0
        self.last_committed = False
        """Whether this worker's last round committed (its state is the quorum's)."""
        self.parity_repairs = 0
        self.last_sync_s = 0.0
        self.shared_digest: str | None = None
        """This rank's digest of its shared state at the last parity check (before any repair)."""
        self._quorum_id: int | None = None
        self._new_quorum = False
        self._t_round = 0.0
        self._loading = False

    # -- state a newcomer receives --------------------------------------------------------------
    def register_state(
        self, state_dict: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]
    ) -> None:
        """What a healing peer downloads from this worker, and how this worker loads it."""

        def save() -> dict[str, Any]:
            # Served to a newcomer over torchft's transport (HTTP, outside the process group).
            state = state_dict()
            nbytes = _nbytes(state)
            self.stats.add("recovery", Traffic(nbytes, 0, nbytes, 0), seconds=0.0)
            return state

        def restore(state: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            load(state)
            self.last_load_s = time.perf_counter() - t0
            self._loading = True

        self.manager.register_state_dict_fn("train", restore, save)

    # -- one round ------------------------------------------------------------------------------
    def begin(self) -> Comm:
        """Block until a quorum exists; heal if behind; return the Comm to reduce over."""
        self._t_round = t0 = time.perf_counter()
        if self.job_finished():
            raise JobFinished(f"{self.replica_id}: the job finished while this worker was behind")
        self._loading = False
        for attempt in range(3):
            try:
                self.manager.start_quorum(timeout=self.quorum_timeout)
                break
            except Exception as e:  # noqa: BLE001 - a quorum that failed (peer gone mid-setup)
                log.warning("%s: quorum failed (%s), retrying", self.replica_id, e)
                if attempt == 2:
                    raise
        self.healed = self._loading
        if self.joining and not self.healed and self.manager.errored() is not None:
            # The heal itself failed (its source died or hung mid-transfer): this worker has no
            # state to take part with. It leaves; the others discard the round and go on.
            raise HealFailed(
                f"{self.replica_id}: healing from a live peer failed "
                f"({str(self.manager.errored()).splitlines()[0][:200]})"
            )
        if self.joining and not self.healed:
            # Every worker in the quorum is a newcomer (step 0): the workers that held the job's
            # state are all gone, and an elastic job keeps it nowhere else.
            raise JobStateLost(
                "no live worker holds the job's state any more (every worker that had it died "
                "before a newcomer could heal from it); start a new run or --resume it from its "
                "last checkpoint"
            )
        self.joining = False
        quorum_id = self.manager._quorum_id  # torchft exposes no getter; read-only use
        self._new_quorum = quorum_id != self._quorum_id
        group = None
        if self._new_quorum:
            self._quorum_id = quorum_id
            try:
                group = self.pg.parent
            except Exception as e:  # noqa: BLE001 - torchft could not configure the quorum's
                # group (a member died while it was being set up) and has reported it: this
                # round cannot commit, so take it alone and rebuild at the next quorum.
                self.report(e)
                self._quorum_id = None
        if group is not None:
            self.comm = Comm(group, self.link, stats=self.stats, seed=self.seed)
            self.detector.comm = self.comm
            self.comm.observers.append(self.detector.record)
            self._exchange_members()
        elif self._new_quorum:
            self.comm = Comm(None, self.link, stats=self.stats, seed=self.seed)
            self._members, self._contributing = [self.index], [not self.healed]
            self.contributors = 1
        else:  # the same members as last time, none of them healing: everybody contributes
            self.contributors = self.comm.size
            self._contributing = [True] * self.comm.size
        seconds = time.perf_counter() - t0
        self.quorum_seconds += seconds
        if self.healed:
            self.event(
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

    def _exchange_members(self) -> None:
        """(worker index, contributes?) of every member: one small all-gather per new quorum (the
        same decision on every member: a heal always comes with a new quorum; torchft bumps its id
        on a join or a commit failure). A failure here fails the round like any other."""
        mine = torch.tensor([self.index, 0 if self.healed else 1], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.comm.size)]
        try:
            self.comm.all_gather(rows, mine)
            self._members = [int(r[0]) for r in rows]
            self._contributing = [bool(r[1]) for r in rows]
        except Exception as e:  # noqa: BLE001
            self.report(e)
            self._members = [self.index] * self.comm.size
            self._contributing = [not self.healed] * self.comm.size
        self.contributors = max(1, sum(self._contributing))

    @property
    def scale(self) -> float:
        return 0.0 if self.healed else self.comm.size / self.contributors

    @property
    def contributing(self) -> list[bool]:
        return list(self._contributing)

    @property
    def members(self) -> list[int]:
        return list(self._members)

    def report(self, error: BaseException) -> None:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("%s: round failed: %s", self.replica_id, text)
        self.manager.report_error(
            error if isinstance(error, Exception) else RuntimeError(str(error))
        )

    def commit(self) -> bool:
        try:
            ok = bool(self.manager.should_commit(timeout=self.timeout))
        except Exception as e:  # noqa: BLE001 - too many failures in a row, or the server died
            log.warning("%s: commit failed: %s", self.replica_id, e)
            ok = False
        self.last_committed = ok
        self.last_sync_s = seconds = time.perf_counter() - self._t_round
        if self._new_quorum:
            self._new_quorum = False
            self.event(
                {
                    "event": "quorum",
                    "participants": self.comm.size,
                    "contributors": self.contributors,
                    "sync_s": seconds,
                    "committed": ok,
                }
            )
        return ok

    def committed(self, shared: Any, step: int) -> None:
        """Parity of the shared state, and now and then the slow-rank exchange (both collectives
        over the quorum, at the same point on every participant)."""
        from lowband.fault.parity import check_parity, shared_state_of, state_digest

        # The cadence must be the same on every participant, a newcomer included: use the
        # committed-round counter (identical after a commit), never a count kept by this process.
        n = self.step
        try:
            if shared is not None and self.parity_every > 0 and n % self.parity_every == 0:
                state = shared_state_of(shared)
                # This rank's own digest, before any repair: what the tests compare across ranks.
                self.shared_digest = f"{state_digest(state.shared_state()):016x}"
                report = check_parity(self.comm, state, step=step)
                if report.event:
                    self.parity_repairs += 1
                    self.event(report.event)
            if self.detect_every > 0 and n % self.detect_every == 0:
                self.detector.exchange()  # slow_rank events go to event()
        except Exception as e:  # noqa: BLE001 - a peer lost during the check: the next quorum copes
            self.report(e)

    def discarded(self, kind: str, step: int, reason: str) -> None:
        self.failed_syncs += 1
        self.event({"event": "sync_discarded", "kind": kind, "local_step": step, "reason": reason})

    def event(self, event: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def metrics(self) -> dict[str, Any]:
        return {
            "participants": self.comm.size,
            "contributors": self.contributors,
            "committed": self.step,
            "failed_syncs": self.failed_syncs,
            "quorum_s": self.quorum_seconds,
            "sync_s": self.last_sync_s,
            "shared_digest": self.shared_digest,
        }

    # -- the rest of the job ------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Committed rounds (torchft's step; the first workers start at 1)."""
        return self.manager.current_step()

    def restore_step(self, step: int) -> None:
        """Resume the committed-round counter (a job resumed from a checkpoint); at least 1, so a
        newcomer (step 0) still heals from this worker."""
        self.manager.load_state_dict({"step": max(1, step), "batches_committed": 0})

    def throttle(self, factor: float) -> None:
        """Divide this worker's emulated bandwidth by `factor` (fault injection: --throttle-at)."""
        if self.link is None:
            return
        self.link = dataclasses.replace(self.link, bandwidth_bps=self.link.bandwidth_bps / factor)
        self.comm.link = self.link
        self.event({"event": "throttled", "replica": self.replica_id, "factor": factor})

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
