"""`Comm`: the one door every byte goes through. Wraps a torch.distributed ProcessGroup.

It counts bytes per operation (lowband.comm.accounting), the time the caller is blocked, and,
when given a LinkSpec, stretches every operation to the emulated link's duration.

Collectives look like torch.distributed's: `comm.all_reduce(t, op="avg", async_op=True) -> Work`.
Ranks are the group's own ranks (0..size-1). `Comm(None)` is a group of one: every collective is
a no-op, so world size 1 runs the same code.

Emulated time. Work issued at t0 really completes at t_done (the backend's future callback tells
when; on loopback that is milliseconds). Its emulated end is

    end = max(t_done, link_free) + link.sample_time(critical_bytes, rounds)

and `wait()` sleeps until `end`. t_done already includes waiting for the last peer to enter, so a
late peer delays everybody as on a real network; `link_free` (the previous emulated end) makes
operations queue on the uplink in the order they are waited on. The real transfer time is
included as well (a few ms on loopback, small next to a wide-area link).

Point-to-point messages are timed at both ends. At issue, a send takes the sender's uplink
(start = max(issue, uplink free), busy for the bytes' transmission time) and stamps the message
with its emulated arrival, start + transmission + latency: 8 bytes of float64 ride behind the
payload on the real transport (emulation metadata, not counted as traffic). The sender's wait
ends when its bytes are out (start + transmission); the receiver's ends at the stamped arrival
(later if its downlink is still busy with an earlier message), however early it posted the
receive. So a message crossing four pipeline stages pays four latencies, and a send is not
blocked for the latency. The stamp is read on the receiver's clock: `time.perf_counter` is the
system-wide monotonic clock on Linux, so this holds for processes on one host, which is where
links are emulated.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from lowband.comm import accounting as acc
from lowband.comm.accounting import CommStats, Traffic
from lowband.comm.link import LinkMap, LinkSpec

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class Work:
    """Handle of an issued operation; `wait()` blocks until it (and its emulated link time) is done."""

    def __init__(
        self,
        comm: Comm,
        op: str,
        works: Sequence,
        traffic: Traffic,
        finish: Callable[[], None] | None = None,
        t_issue: float | None = None,
        deadline: Callable[[], float] | None = None,
    ) -> None:
        self._deadline = deadline
        self._comm, self._op, self._works, self._traffic, self._finish = (
            comm,
            op,
            list(works),
            traffic,
            finish,
        )
        self._t_done: float | None = None
        self._t_issue = time.perf_counter() if t_issue is None else t_issue
        self._done = False
        for w in self._works:
            try:
                w.get_future().add_done_callback(self._mark_done)
            except (RuntimeError, AttributeError):  # backends without futures: timed at wait()
                pass

    def _mark_done(self, _fut) -> None:
        now = time.perf_counter()
        self._t_done = now if self._t_done is None else max(self._t_done, now)

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self) -> None:
        if self._done:
            return
        t0 = time.perf_counter()
        for w in self._works:
            w.wait()
        t_done = (
            time.perf_counter() if self._t_done is None else min(self._t_done, time.perf_counter())
        )
        if self._deadline is not None:  # a message over an emulated link (module docstring)
            _sleep_until(self._deadline())
        elif self._op not in ("send", "recv"):
            self._comm._sleep_for_link(t_done, self._traffic)
        if self._finish is not None:
            self._finish()
        self._done = True
        seconds = time.perf_counter() - t0
        background = self._comm.in_background
        self._comm.stats.add(self._op, seconds=seconds, background=background)
        for observe in self._comm.observers:
            observe(self._op, self._t_issue, seconds, background)


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


_STAMP = 8
"""Bytes of a message's emulated arrival time (float64) behind its payload."""


def _global_ranks(group: dist.ProcessGroup | None, size: int) -> list[int]:
    """The global ranks of a group's members, in group-rank order (a link map names global
    ranks). Groups torch.distributed does not know (torchft's, tests' fakes) count as 0..size-1."""
    if group is None:
        return [dist.get_rank()] if dist.is_initialized() else [0]
    try:
        return list(dist.get_process_group_ranks(group))
    except (RuntimeError, ValueError, KeyError, AttributeError):
        return list(range(size))


class _DoneWork:
    def wait(self) -> None: ...
    def is_completed(self) -> bool:
        return True

    def get_future(self):
        raise RuntimeError


class _Wire:
    """This worker's emulated uplinks and downlinks: when each is next free (emulated end of the
    last operation on it), one pair per distinct link (with --link-map, a site's fast local link
    does not queue behind its wide-area one). Shared by the Comms a worker derives from one
    another."""

    def __init__(self) -> None:
        self.free: dict[tuple[LinkSpec, bool], float] = {}
        self.lock = threading.Lock()


class Comm:
    """Byte-counting, link-emulating view of one process group."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        link: LinkSpec | LinkMap | None = None,
        *,
        stats: CommStats | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.group = group
        self.device = torch.device(device)
        """Where this group's tensors must live (cuda for NCCL): small control tensors are made here."""
        self.stats = stats if stats is not None else CommStats()
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.link_map = link if isinstance(link, LinkMap) else None
        """A link per pair (--link-map): point-to-point messages take their pair's link."""
        self.global_ranks = _global_ranks(group, self.size)
        self.link: LinkSpec | None = (
            self.link_map.for_ranks(self.global_ranks) if self.link_map is not None else link
        )
        """The link every collective of this group sees (with a map: the group's slowest pair)."""
        self._rng = random.Random(seed * 100_003 + self.rank)
        # --link ...:noise=SIGMA: additive noise on received floating-point payloads, drawn in
        # the order of operations from (seed, rank), so a run is reproducible (_noisy).
        self._noise = torch.Generator().manual_seed(seed * 1_000_003 + self.rank + 1)
        self._wire = _Wire()
        self._thread_state = threading.local()
        self.stage_on_host: bool | str = group is not None and group.name() == "gloo"
        """Gloo reads host memory: a GPU tensor travels through a host copy (several workers
        sharing one GPU run Gloo, since NCCL refuses two ranks on one device). "always" copies CPU
        tensors too: the tests drive the staging path with them."""
        self.observers: list[Callable[[str, float, float, bool], None]] = []
        """Called after every wait with (op, issue time, seconds blocked, background), e.g. by the
        C4-style detector (lowband.fault.detector). Observers must not issue operations."""

    def derive(self, group: dist.ProcessGroup) -> Comm:
        """A Comm over another group of the same ranks (a private group for background
        reductions) that shares this one's byte counters, link, emulated wire and observers."""
        other = Comm(group, self.link_map or self.link, stats=self.stats, device=self.device)
        other._rng, other._wire, other.observers = self._rng, self._wire, self.observers
        other._noise = self._noise
        if self.stage_on_host == "always":
            other.stage_on_host = "always"
        return other

    # -- background threads -------------------------------------------------------------------
    @property
    def in_background(self) -> bool:
        return getattr(self._thread_state, "background", False)

    @contextlib.contextmanager
    def background(self):
        """Mark this thread's operations as overlapped: their time is counted as background time,
        not as the exposed communication time the training loop subtracts from compute."""
        self._thread_state.background = True
        try:
            yield self
        finally:
            self._thread_state.background = False

    # -- emulated link ------------------------------------------------------------------------
    def _link_to(self, peer: int | None) -> LinkSpec | None:
        """The link to group rank `peer` (None: the group's link, for collectives)."""
        if peer is None or self.link_map is None:
            return self.link
        return self.link_map.between(self.global_ranks[self.rank], self.global_ranks[peer])

    def _sleep_for_link(self, t_done: float, traffic: Traffic) -> None:
        """A collective's emulated time: its rounds run one after another on the group's link,
        after the operations before it on this worker's wire."""
        link = self.link
        if link is None or traffic.rounds == 0:
            return
        # A pure receive (a broadcast's leaves) queues on the downlink, so a send and a receive
        # overlap as on a full-duplex link.
        downlink = traffic.sent == 0 and traffic.recv > 0
        wire = self._wire
        with wire.lock:  # a background thread may share the wire
            start = max(t_done, wire.free.get((link, downlink), 0.0))
            end = start + link.sample_time(traffic.critical_bytes, traffic.rounds, self._rng)
            wire.free[(link, downlink)] = end
        _sleep_until(end)

    def _take_uplink(self, link: LinkSpec, nbytes: int, t_issue: float) -> tuple[float, float]:
        """A message leaving now: (when its bytes are out, its emulated arrival at the peer)."""
        with self._wire.lock:
            start = max(t_issue, self._wire.free.get((link, False), 0.0))
            out = start + link.sample_time(nbytes, 0, self._rng)
            self._wire.free[(link, False)] = out
            return out, out + link.sample_time(0, 1, self._rng)

    def _take_downlink(self, link: LinkSpec, nbytes: int, arrival: float) -> float:
        """A message stamped to arrive at `arrival`: when it is in, after earlier ones."""
        with self._wire.lock:
            busy = link.sample_time(nbytes, 0, self._rng)
            end = max(arrival, self._wire.free.get((link, True), 0.0) + busy)
            self._wire.free[(link, True)] = end
            return end

    # -- emulated noise (--link ...:noise=SIGMA) ---------------------------------------------
    _NOISY = (torch.float32, torch.float16, torch.bfloat16)

    def _noisy(self, finish, received: Sequence[torch.Tensor], peer: int | None = None):
        """`finish`, then N(0, SIGMA^2) added to every received fp32/fp16/bf16 element. Exact:
        integer and byte payloads (codecs, indices), float64 control values (the summary,
        timings) and start-up traffic (`stats.setup()`)."""
        link = self._link_to(peer)
        sigma = link.noise if link is not None else 0.0
        received = [t for t in received if t.dtype in self._NOISY]
        if (
            not sigma
            or not received
            or self.size == 1
            or getattr(self.stats._local, "setup", False)
        ):
            return finish

        def noisy_finish() -> None:
            if finish is not None:
                finish()
            for t in received:
                z = torch.randn(t.shape, generator=self._noise, dtype=torch.float32)
                t.add_((z * sigma).to(device=t.device, dtype=t.dtype))

        return noisy_finish

    def _issue(
        self,
        op: str,
        traffic: Traffic,
        launch: Callable[[], Sequence],
        async_op: bool,
        finish=None,
        deadline: Callable[[], float] | None = None,
        t_issue: float | None = None,
    ) -> Work:
        t0 = time.perf_counter() if t_issue is None else t_issue
        works = launch() if self.size > 1 else [_DoneWork()]
        self.stats.add(op, traffic, seconds=time.perf_counter() - t0, background=self.in_background)
        work = Work(self, op, works, traffic, finish, t_issue=t0, deadline=deadline)
        if not async_op:
            work.wait()
        return work

    # -- host staging (stage_on_host) ---------------------------------------------------------
    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """What the group reads: `t` itself, or a host copy of it (returned results are copied
        back by `_back`)."""
        if not self.stage_on_host or (t.device.type == "cpu" and self.stage_on_host != "always"):
            return t
        return t.detach().to("cpu", copy=True)

    @staticmethod
    def _back(pairs: list[tuple[torch.Tensor, torch.Tensor]], then=None) -> Callable[[], None]:
        """A finish that runs `then` on the host buffers and copies them back to the originals."""

        def finish() -> None:
            if then is not None:
                then()
            for original, buf in pairs:
                if buf is not original:
                    original.copy_(buf)

        return finish

    # -- collectives --------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> Work:
        """In-place all-reduce. op: sum | avg | max | min. avg divides after a sum (Gloo has no AVG)."""
        if op not in (*_REDUCE_OPS, "avg"):
            raise ValueError(f"unknown reduce op {op!r}")
        traffic = acc.all_reduce_traffic(
            tensor.numel(), tensor.element_size(), self.rank, self.size
        )

        buf = self._host(tensor)

        def launch():
            opts = dist.AllreduceOptions()
            opts.reduceOp = _REDUCE_OPS["sum" if op == "avg" else op]
            return [self.group.allreduce([buf], opts)]

        average = (lambda: buf.div_(self.size)) if op == "avg" and self.size > 1 else None
        return self._issue(
            "all_reduce",
            traffic,
            launch,
            async_op,
            self._noisy(self._back([(tensor, buf)], average), [tensor]),
        )

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Work:
        traffic = acc.broadcast_traffic(
            tensor.numel(), tensor.element_size(), self.rank, src, self.size
        )

        buf = self._host(tensor)

        def launch():
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            return [self.group.broadcast([buf], opts)]

        return self._issue(
            "broadcast",
            traffic,
            launch,
            async_op,
            self._noisy(self._back([(tensor, buf)]), [tensor] if self.rank != src else []),
        )

    def all_gather(
        self, outputs: list[torch.Tensor], tensor: torch.Tensor, async_op: bool = False
    ) -> Work:
        """outputs[i] receives rank i's tensor (all the same shape)."""
        if len(outputs) != self.size:
            raise ValueError(f"all_gather needs {self.size} outputs, got {len(outputs)}")
        traffic = acc.all_gather_traffic(
            tensor.numel(), tensor.element_size(), self.rank, self.size
        )
        if self.size == 1:
            outputs[0].copy_(tensor)
        bufs, buf = [self._host(o) for o in outputs], self._host(tensor)
        return self._issue(
            "all_gather",
            traffic,
            lambda: [self.group.allgather([bufs], [buf])],
            async_op,
            self._noisy(
                self._back(list(zip(outputs, bufs, strict=True))),
                [o for i, o in enumerate(outputs) if i != self.rank],
            ),
        )

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work:
        """Equal splits along dim 0: chunk i of `input` goes to rank i; chunk j of `output` comes from rank j."""
        if input.shape[0] % self.size or output.shape != input.shape:
            raise ValueError(
                "all_to_all needs same-shape input/output whose first dim divides by the group size"
            )
        traffic = acc.all_to_all_traffic(input.numel(), input.element_size(), self.rank, self.size)
        if self.size == 1:
            output.copy_(input)
        out_buf, in_buf = self._host(output), self._host(input)
        return self._issue(
            "all_to_all",
            traffic,
            lambda: [self.group.alltoall_base(out_buf, in_buf, [], [], dist.AllToAllOptions())],
            async_op,
            self._noisy(
                self._back([(output, out_buf)]),
                [c for i, c in enumerate(output.chunk(self.size)) if i != self.rank],
            ),
        )

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0, async_op: bool = False) -> Work:
        traffic = acc.p2p_traffic(tensor.numel(), tensor.element_size(), sending=True)
        buf = self._host(tensor)
        link = self._link_to(dst) if self.size > 1 else None
        if link is None:
            return self._issue(
                "send", traffic, lambda: [self.group.send([buf], dst, tag)], async_op
            )
        t0 = time.perf_counter()
        out, arrival = self._take_uplink(link, traffic.critical_bytes, t0)
        stamp = torch.tensor([arrival], dtype=torch.float64).view(torch.uint8)
        msg = torch.cat([buf.reshape(-1).view(torch.uint8), stamp.to(buf.device)])
        return self._issue(
            "send",
            traffic,
            lambda: [self.group.send([msg], dst, tag)],
            async_op,
            deadline=lambda: out,
            t_issue=t0,
        )

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0, async_op: bool = False) -> Work:
        traffic = acc.p2p_traffic(tensor.numel(), tensor.element_size(), sending=False)
        buf = self._host(tensor)
        finish = self._noisy(self._back([(tensor, buf)]), [tensor], peer=src)
        link = self._link_to(src) if self.size > 1 else None
        if link is None:
            return self._issue(
                "recv", traffic, lambda: [self.group.recv([buf], src, tag)], async_op, finish
            )
        nbytes = traffic.critical_bytes
        msg = torch.empty(nbytes + _STAMP, dtype=torch.uint8, device=buf.device)

        def unpack() -> None:
            buf.copy_(msg[:nbytes].view(buf.dtype).view(buf.shape))
            if finish is not None:
                finish()

        def arrived() -> float:
            stamp = msg[nbytes:].to("cpu", copy=True).view(torch.float64).item()
            return self._take_downlink(link, nbytes, stamp)

        return self._issue(
            "recv",
            traffic,
            lambda: [self.group.recv([msg], src, tag)],
            async_op,
            unpack,
            deadline=arrived,
        )

    def start_together(self, margin_s: float = 0.02) -> float:
        """Return at one instant on every worker, and that instant: an all-reduce (max) of the
        workers' clocks straight on the group (not emulated, not counted), then a sleep to the
        latest reading + margin_s. For timings that start on one worker and end on another
        (a request's TTFT); the clock is one host's `time.perf_counter`, as the emulated links
        assume (module docstring). A worker later than the margin starts late, as it would."""
        if self.size == 1:
            return time.perf_counter()
        host = self.stage_on_host or self.device.type == "cpu"
        t = torch.tensor(
            [time.perf_counter()], dtype=torch.float64, device="cpu" if host else self.device
        )
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.group.allreduce([t], opts).wait()
        start = t.item() + margin_s
        _sleep_until(start)
        return start

    def barrier(self) -> None:
        self._issue(
            "barrier",
            Traffic(0, 0, 0, 2 if self.size > 1 else 0),
            lambda: [self.group.barrier()],
            False,
        )
