"""Straggler injection and a coded round that finishes on the first n - s arrivals.

`StragglerInjector` decides, from a seed and the round number alone, which workers are slow in a
round and by how much, so every rank computes the same table without talking.

`coded_round` runs one round of gradient coding over a Comm, with rank `root` as the master:

    1. every rank encodes its parts' gradients: f_i = sum_j B[i, j] g_j (lowband.coding.encoders);
    2. every rank but root sleeps its injected delay (a slow worker), then sends f_i to root
       (tag 2 * round); with abandon=True the delay ends early once root's result has arrived;
    3. root posts a receive for every other rank (one waiter thread each); its own f_root counts as
       arriving `delay` seconds after the round started (its compute delay is simulated, not
       slept). As soon as n - s have arrived it decodes sum_j g_j from them, in arrival order
       (fractional repetition: the first arrival of every group);
    4. root sends the decoded gradient to every other rank (tag 2 * round + 1); each of them
       receives it once it has sent its own message, so a straggler gets it late but gets it.

Root never waits for the stragglers: their receives (and the result sends to them) are left in
flight and returned as `pending`; call `CodedRound.wait_stragglers()` (or drain them at the start
of the next round, when the late workers have long finished) before the tensors are dropped.
Bytes, all counted by Comm: a worker sends V and receives V elements; root receives (n - 1) V and
sends (n - 1) V, late messages included.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lowband.coding.encoders import GradientCode
from lowband.comm import Comm, Work
from lowband.errors import ConfigError

__all__ = ["CodedRound", "StragglerInjector", "coded_round"]


@dataclass(frozen=True)
class StragglerInjector:
    """Seeded per-round delays: each worker straggles with probability p, for delay_s seconds.

    max_stragglers caps the stragglers of a round (keep it <= s and every round decodes);
    base_s is every worker's delay, jitter_s a uniform extra one. Deterministic in (seed, round).
    """

    n: int
    p: float = 0.1
    delay_s: float = 0.5
    base_s: float = 0.0
    jitter_s: float = 0.0
    max_stragglers: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or not 0 <= self.p <= 1 or min(self.delay_s, self.base_s, self.jitter_s) < 0:
            raise ConfigError(
                "stragglers need n >= 1, 0 <= p <= 1 and non-negative delays, got "
                f"n = {self.n}, p = {self.p}, delay = {self.delay_s}, base = {self.base_s}, "
                f"jitter = {self.jitter_s}"
            )

    def _rng(self, round_: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + round_)

    def stragglers(self, round_: int) -> frozenset[int]:
        rng = self._rng(round_)
        slow = [i for i in range(self.n) if rng.random() < self.p]
        if self.max_stragglers is not None and len(slow) > self.max_stragglers:
            slow = sorted(rng.sample(slow, self.max_stragglers))
        return frozenset(slow)

    def delay(self, round_: int, rank: int) -> float:
        """Seconds worker `rank` computes longer than usual in `round_`."""
        jitter = random.Random((self.seed * 1_000_003 + round_) * 65_537 + rank).random()
        slow = self.delay_s if rank in self.stragglers(round_) else 0.0
        return self.base_s + self.jitter_s * jitter + slow


class _Join:
    """A waiter thread as something with wait()."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread

    def wait(self) -> None:
        self.thread.join()


@dataclass
class CodedRound:
    """What coded_round returns on one rank."""

    gradient: Tensor
    """sum_j g_j over all n parts (divide by n for the mean); the same on every rank."""
    survivors: list[int]
    """The ranks root decoded from, in arrival order (root's view; rank i's own list on others)."""
    seconds: float
    """Wall time of this rank in coded_round."""
    pending: list = field(default_factory=list)
    """Operations left in flight: the stragglers' messages and the results sent to them (root)."""

    def wait_stragglers(self) -> None:
        for w in self.pending:
            w.wait()
        self.pending = []


def coded_round(
    comm: Comm,
    code: GradientCode,
    partial_grads: Mapping[int, Tensor],
    *,
    round_: int = 0,
    root: int = 0,
    delay_s: float = 0.0,
    timeout_s: float = 60.0,
    abandon: bool = False,
) -> CodedRound:
    """One gradient-coding round over comm (steps in the module docstring).

    partial_grads: {part: gradient} for this rank's parts, code.parts(comm.rank) (1-D tensors of
    one dtype and length). delay_s: this rank's injected compute delay (StragglerInjector.delay).
    abandon: a slow rank stops its delay as soon as root's result arrives (root decoded without
    it), as a straggler whose work is no longer needed would; it still sends its message, which
    root has a receive posted for. Training uses this, so a straggler does not carry its delay
    into the next round.
    """
    if comm.size != code.n:
        raise ConfigError(
            f"a code for n = {code.n} workers needs a group of {code.n}, got {comm.size}"
        )
    t0 = time.perf_counter()
    rank, n = comm.rank, comm.size
    coded = code.encode(rank, partial_grads).contiguous()
    tag_in, tag_out = 2 * round_, 2 * round_ + 1

    if rank != root:
        out = torch.empty_like(coded)
        if abandon and delay_s > 0:
            # Root sends the result only after n - s arrivals, so posting its receive before our
            # send cannot deadlock: either it comes without us, or it waits for our send.
            result = comm.recv(out, root, tag=tag_out, async_op=True)
            landed = threading.Event()

            def wait_result() -> None:
                with comm.background():
                    result.wait()
                landed.set()

            waiter = threading.Thread(target=wait_result, daemon=True)
            waiter.start()
            landed.wait(delay_s)  # the injected compute delay, cut short once it is moot
            comm.send(coded, root, tag=tag_in)
            waiter.join()
            return CodedRound(out, [], time.perf_counter() - t0)
        if delay_s > 0:
            time.sleep(delay_s)
        comm.send(coded, root, tag=tag_in)
        comm.recv(out, root, tag=tag_out)
        return CodedRound(out, [], time.perf_counter() - t0)

    # Gloo marks a receive complete only inside wait(), so one thread per peer blocks in it and
    # reports the arrival; root takes arrivals in order until n - s are in.
    bufs = {j: torch.empty_like(coded) for j in range(n) if j != root}
    arrivals: queue.Queue[int] = queue.Queue()

    def wait_for(j: int, work: Work) -> None:
        with comm.background():  # overlapped with root's decoding: background time
            work.wait()
        arrivals.put(j)

    waiters = {}
    for j in bufs:
        work = comm.recv(bufs[j], j, tag=tag_in, async_op=True)
        waiters[j] = threading.Thread(target=wait_for, args=(j, work), daemon=True)
        waiters[j].start()
    arrived: dict[int, Tensor] = {}
    own_ready, deadline, need = t0 + delay_s, t0 + timeout_s, n - code.s
    while len(arrived) < need:
        now = time.perf_counter()
        if root not in arrived and now >= own_ready:
            arrived[root] = coded
            continue
        if now > deadline:
            raise TimeoutError(f"coded_round {round_}: {len(arrived)} of {need} arrived")
        until = deadline if root in arrived else min(own_ready, deadline)
        try:
            j = arrivals.get(timeout=max(until - now, 0.0))
        except queue.Empty:
            continue
        arrived[j] = bufs[j]
    survivors = list(arrived)
    gradient = code.decode(arrived)
    pending: list = [_Join(waiters[j]) for j in bufs if j not in arrived]
    for j in bufs:
        work = comm.send(gradient, j, tag=tag_out, async_op=True)
        if j in arrived:
            work.wait()
        else:
            pending.append(work)
    return CodedRound(gradient, survivors, time.perf_counter() - t0, pending)
