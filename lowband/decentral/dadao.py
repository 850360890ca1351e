"""DADAO (Nabli and Oyallon, ICML 2023): decoupled gradient and gossip events on Poisson clocks.

For L-smooth, mu-strongly convex f = sum_i f_i over a graph (docs/decentralized.md). The rule is
transcribed from the authors' public code (github.com/AdelNabli/DADAO, optimizers.py,
DADAO_optimizer; the paper's constants as that code sets them). Node i holds six vectors
(X, X~, Y, Y~, Z, Z~), all starting at 0 except X (the common start x0), and its time t_i of last
event. With nu = mu/2:

  1. Between events the six vectors follow a linear ODE, applied lazily at the node's next event:
     P <- expm(M (t - t_i)) P, with M (6 x 6) over (X, X~, Y, Y~, Z, Z~):
       dX  = eta (X~ - X)                 dX~ = eta (X - X~)
       dY  = alpha (Y~ - Y)               dY~ = -theta (nu X~ + Y + Z)
       dZ  = alpha (Z~ - Z)               dZ~ = alpha~ (Z - Z~)
     alpha = sqrt(nu/L)/4, alpha~ = eta = sqrt(nu/L)/8, theta = sqrt(L/nu)/2.
  2. Gradient event at node i (its own Poisson clock, rate `grad_rate`): after the ODE,
     r = grad f_i(X) - nu X - Y~;  X -= gamma r;  X~ -= gamma~ r;  Y~ += (delta + delta~) r,
     gamma = 1/(4L), gamma~ = 1/(4 sqrt(L nu)), delta = sqrt(nu/L)/4, delta~ = 1.
  3. Gossip event on edge (i, j) (the edge's own Poisson clock, rate r_ij): after the ODE on both
     ends, i and j exchange m = Y + Z; at i, p = m_i - m_j;  Z -= beta p;  Z~ -= beta~ p, with
     beta = 1/2, beta~ = 2 chi1* sqrt(L/nu), chi1* = 1 / lambda_min+(Lambda), Lambda = sum over
     edges of r_ij (e_i - e_j)(e_i - e_j)^T (the rate-weighted Laplacian).
Total gossip rate: `sqrt(2 chi1 chi2)` of the uniform-probability Laplacian (L_graph / |E|), as the
authors' run script says ("lamb_mix ... should be sqrt(2 chi_1* chi_2*)"); chi2 is the largest
edge resistance (1/2)(e_i - e_j)^T L^+ (e_i - e_j). Rates per edge (lowband.decentral.rates,
`gossip_rates`): "uniform" (total / |E| each), "resistance" (proportional to each edge's effective
resistance: a heuristic that favours bridges) or "sdp" (the rates that minimise the total rate
under 2 chi1 chi2 <= 1: the paper's SDP, solved with cvxpy).

The schedule is a pure function of the seed: node i's gradient clock from
random.Random("dadao:grad:SEED:i"), edge (i, j)'s clock from random.Random("dadao:edge:SEED:i:j"),
so both ends of an edge know its event times without talking. `simulate` plays every event of
every node in one process (the reference); `DADAONode` plays one node's events in its process,
with point-to-point messages only on its edges.

Two runtimes (`DADAONode(mode=...)`); both may pace the clocks in real time (`pace`: wall seconds
per Poisson time unit, from a `start` every node agrees on), or play events as fast as they can.

Rendezvous runtime and deadlock freedom (`mode="rendezvous"`, the default). Each node processes its own events (its gradient
events and its edges' gossip events) in increasing time; there is no global clock and no barrier.
A gossip event is a pairwise rendezvous: both ends post their send and receive (tag: the event's
index on that edge), then wait.
  1. Both ends of an edge derive the same event list for it, so the k-th event of edge (i, j) is
     the k-th at both ends, with the same tag: every send has exactly one matching receive.
  2. Take the unprocessed event with the smallest time over the whole graph (times are distinct
     with probability 1). Every event of its nodes with a smaller time is processed, so it is the
     next event of each of its nodes: both ends are at it, their operations match, it completes.
     By induction every event completes: no deadlock, whatever the nodes' speeds.
  3. A neighbour that stalls or dies: the wait raises after `timeout_s` (the process group's
     timeout); the node skips the event, drops the edge for the rest of the run and carries on.
     A stalled node therefore costs each neighbour one timeout, never a hang; nodes that are not
     its neighbours never wait for it.
Reproducible: with no edge dropped, every node's vectors are bit-identical to `simulate`'s (same
events, same order, same arithmetic). Not reproducible: which events a dropped edge misses
(that depends on wall-clock). The cost: a slow node delays its neighbours at their shared
events, and through them the whole graph.

Mailbox runtime (`mode="mailbox"`): a node never waits for a neighbour.
  1. Gossip event k of edge (i, j) at i: i sends m_i(t_k) to j (async, tag k; a background thread
     waits for the sends, in order) and looks in its mailbox for j's message k. If it is there, i
     applies step 3 at once, as the rendezvous would. If not, i keeps m_i(t_k) and goes on; the
     update is applied when message k comes (checked before each of i's events), as of t_k: the
     ODE is linear, so adding expm(M (t - t_k)) dP at t equals adding dP at t_k. Both ends thus
     apply the same p = m_i(t_k) - m_j(t_k) with opposite signs: sum_i Z_i and sum_i Z~_i stay 0
     (the pairwise conservation DADAO's dual relies on), however late a message is. (Using j's
     *latest* message instead, p = m_i - m_j_stale, breaks that conservation: tried on a 4-node
     ring, the error stayed between 1e-2 and 0.6 where the rendezvous reached 1e-7.)
  2. The mailbox: one receiver thread per neighbour posts exactly as many receives as the edge has
     events (known from the shared clock), tags 0, 1, ..., one at a time, each blocking only
     that thread.
  3. Gradient events run in a background thread; the node waits for its own gradient at most
     until its next event is due, then goes on (the gradient's increment is applied when done, as
     of its event time, like a late gossip update). A gradient tick that rings while the previous
     gradient is still being computed is lost (`skipped`): a slow worker computes fewer
     gradients, as on the paper's real-time clocks, while its gossip stays on time.
  Deadlock freedom: the event loop never blocks on a peer (sends are async, reads are mailbox
  look-ups; with a pace it sleeps only for its own clock). Every send has exactly one matching
  receive: the peer's receiver thread posts one per edge event, in order, whatever the peer's
  event loop does, so sends complete. At the end a node waits for its sends and receivers (its
  answer x_i is final before that: X and X~ change only at gradient events); each wait ends by
  the process group's timeout at the latest, after which the edge is dropped, so a stalled
  neighbour costs one timeout per edge, never a hang.
  Reproducible: nothing bit for bit (which updates are late, and by how much, depends on timing;
  so do lost gradient ticks). With messages that arrive before the node's next event it equals
  the rendezvous up to rounding. Late updates are an asynchronous-with-delays variant that the
  paper does not analyse. Simulated with one end of every edge late by d (8-node ring, ridge,
  t = 100, against d = 0): d = 0.05 makes the error 1.8x higher, d = 0.1 1,800x, d = 0.3
  diverges. So `pace` must keep message latency to a few hundredths of a Poisson time unit.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from lowband.decentral.rates import chi1, gossip_rates, laplacian, undirected_edges
from lowband.decentral.topology import Topology

GradFn = Callable[[int, torch.Tensor], torch.Tensor]
"""grad_fn(node, x) -> grad f_node(x)."""


# -- constants and the schedule -----------------------------------------------------------------
@dataclass
class Constants:
    """The paper's constants, as the authors' code sets them (module docstring)."""

    mu: float
    L: float
    chi1_star: float
    nu: float = field(init=False)
    M: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        mu, L = self.mu, self.L
        self.nu = nu = mu / 2
        s = math.sqrt(nu / L)
        alpha, alpha_t, eta, theta = s / 4, s / 8, s / 8, 0.5 / s
        self.beta, self.beta_t = 0.5, 2 * self.chi1_star / s
        self.delta, self.delta_t = s / 4, 1.0
        self.gamma, self.gamma_t = 1 / (4 * L), 1 / (4 * math.sqrt(L * nu))
        M = torch.zeros(6, 6, dtype=torch.float64)  # order: X, X~, Y, Y~, Z, Z~
        M[0, 0], M[0, 1], M[1, 0], M[1, 1] = -eta, eta, eta, -eta
        M[2, 2], M[2, 3] = -alpha, alpha
        M[3, 1], M[3, 2], M[3, 4] = -theta * nu, -theta, -theta
        M[4, 4], M[4, 5], M[5, 4], M[5, 5] = -alpha, alpha, alpha_t, -alpha_t
        self.M = M


def poisson_times(rng: random.Random, rate: float, t_max: float) -> list[float]:
    times, t = [], 0.0
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= t_max:
            break
        times.append(t)
    return times


def node_events(
    node: int,
    edges: list[tuple[int, int]],
    rates: list[float],
    seed: int,
    t_max: float,
    grad_rate: float = 1.0,
) -> list[tuple[float, int, int]]:
    """Node's events in time order: (t, peer, k) with peer = -1 for a gradient event, else the
    neighbour of the edge and k the event's index on that edge."""
    out = [(t, -1, k) for k, t in enumerate(
        poisson_times(random.Random(f"dadao:grad:{seed}:{node}"), grad_rate, t_max)
    )]  # fmt: skip
    for (i, j), r in zip(edges, rates):
        if node in (i, j):
            times = poisson_times(random.Random(f"dadao:edge:{seed}:{i}:{j}"), r, t_max)
            out += [(t, j if node == i else i, k) for k, t in enumerate(times)]
    return sorted(out)


# -- one node's state ---------------------------------------------------------------------------
class NodeState:
    """The six vectors of one node and its last event time; the three event rules."""

    def __init__(self, x0: torch.Tensor, c: Constants) -> None:
        self.c = c
        self.P = torch.zeros(6, x0.numel(), dtype=torch.float64)
        self.P[0] = x0.double()
        self.t = 0.0

    @property
    def x(self) -> torch.Tensor:
        return self.P[0]

    def peek(self, t: float) -> torch.Tensor:
        """X at time t >= self.t had no event happened since self.t (the state is unchanged)."""
        return (torch.linalg.matrix_exp(self.c.M * (t - self.t)) @ self.P)[0]

    def ode(self, t: float) -> None:
        self.P = torch.linalg.matrix_exp(self.c.M * (t - self.t)) @ self.P
        self.t = t

    def gradient(self, t: float, g_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.ode(t)
        c, P = self.c, self.P
        r = g_fn(P[0].clone()) - c.nu * P[0] - P[3]
        P[0] -= c.gamma * r
        P[1] -= c.gamma_t * r
        P[3] += (c.delta + c.delta_t) * r

    def message(self, t: float) -> torch.Tensor:
        """Y + Z after the ODE to t: what this node sends at a gossip event."""
        self.ode(t)
        return self.P[2] + self.P[4]

    def gossip(self, mine: torch.Tensor, theirs: torch.Tensor) -> None:
        p = mine - theirs
        self.P[4] -= self.c.beta * p
        self.P[5] -= self.c.beta_t * p


def constants_for(topo: Topology, rates: list[float], mu: float, L: float) -> Constants:
    return Constants(mu, L, chi1(laplacian(topo.n, undirected_edges(topo), rates)))


# -- the reference: every node in one process ---------------------------------------------------
def simulate(
    topo: Topology,
    grad_fn: GradFn,
    x0: torch.Tensor,
    mu: float,
    L: float,
    t_max: float,
    seed: int = 0,
    rates: list[float] | None = None,
    grad_rate: float = 1.0,
    record: Callable[[float, list[NodeState]], None] | None = None,
) -> list[NodeState]:
    """Play every event of every node in global time order; `record(t, states)` after each."""
    edges = undirected_edges(topo)
    rates = gossip_rates(topo) if rates is None else rates
    c = constants_for(topo, rates, mu, L)
    states = [NodeState(x0, c) for _ in range(topo.n)]
    events = []
    for i in range(topo.n):
        events += [(t, i, peer, k) for t, peer, k in node_events(i, edges, rates, seed, t_max,
                                                                   grad_rate)]  # fmt: skip
    done: dict[tuple[int, int, int], torch.Tensor] = {}
    for t, i, peer, _k in sorted(events):
        s = states[i]
        if peer < 0:
            s.gradient(t, lambda x, i=i: grad_fn(i, x))
        else:  # both ends appear in `events`: the first computes both messages
            key = (min(i, peer), max(i, peer), _k)
            if key not in done:
                done[key] = (s.message(t), states[peer].message(t))
                mine, theirs = done[key]
            else:
                theirs, mine = done.pop(key)
            s.gossip(mine, theirs)
        if record is not None:
            record(t, states)
    return states


# -- one node per process: point to point along the edges ---------------------------------------
RUNTIMES = ("rendezvous", "mailbox")


class _Mailbox:
    """The messages of each neighbour j by edge event index, filled by one receiver thread per
    neighbour that posts exactly `counts[j]` receives (tags 0, 1, ...: the edge's event indices),
    one at a time, in order. The event loop pops message k when it has played event k."""

    def __init__(self, comm: Any, counts: dict[int, int], like: torch.Tensor) -> None:
        self.comm = comm
        self.box: dict[int, dict[int, torch.Tensor]] = {j: {} for j in counts}
        self.received = dict.fromkeys(counts, 0)
        self.failed: set[int] = set()
        self.threads = [
            threading.Thread(target=self._receive, args=(j, n, like), daemon=True)
            for j, n in counts.items()
        ]
        for t in self.threads:
            t.start()

    def _receive(self, peer: int, count: int, like: torch.Tensor) -> None:
        with self.comm.background():
            for k in range(count):
                buf = torch.empty_like(like)
                try:  # blocks this thread only; raises after the group's timeout
                    self.comm.recv(buf, src=peer, tag=k % 2**31)
                except RuntimeError:  # the peer stopped sending (stalled, died or dropped us)
                    self.failed.add(peer)
                    return
                self.box[peer][k] = buf  # only this thread adds; the event loop only pops
                self.received[peer] += 1

    def join(self) -> None:
        for t in self.threads:
            t.join()


class _Outbox:
    """Sends issued from the event loop without waiting; a background thread waits for them in
    order (Gloo completes a send once the peer has posted its receive). After one send to a peer
    fails, that peer's later sends are abandoned rather than each waiting out the timeout."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.failed: set[int] = set()
        self.sent: dict[int, int] = {}
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def send(self, m: torch.Tensor, peer: int, k: int) -> None:
        work = self.comm.send(m, dst=peer, tag=k % 2**31, async_op=True)
        self.sent[peer] = self.sent.get(peer, 0) + 1
        self.queue.put((peer, work, m))  # m stays alive until its send is done

    def _drain(self) -> None:
        with self.comm.background():
            while (item := self.queue.get()) is not None:
                peer, work, _m = item
                if peer in self.failed:
                    continue
                try:
                    work.wait()
                except RuntimeError:
                    self.failed.add(peer)

    def join(self) -> None:
        self.queue.put(None)
        self.thread.join()


class DADAONode:
    """Node `comm.rank` of the graph, playing its own events (module docstring: runtimes).

    `mode`: "rendezvous" (each gossip event waits for the neighbour; bit-identical to `simulate`)
    or "mailbox" (never waits; applies each update when both messages are in). `pace`: wall seconds per unit
    of Poisson time; an event at time t is played no earlier than t * pace after `run` starts
    (0: as fast as the node can; the Poisson clocks then tick in work, not in real time).
    Mailbox also computes gradients in a background thread: a gradient tick that rings while the
    previous gradient is still being computed is lost (`skipped`), so a slow worker computes
    fewer gradients (as on the paper's real-time clocks) while its gossip stays on time."""

    def __init__(
        self,
        comm: Any,
        topo: Topology,
        grad_fn: GradFn,
        x0: torch.Tensor,
        mu: float,
        L: float,
        t_max: float,
        seed: int = 0,
        rates: list[float] | None = None,
        grad_rate: float = 1.0,
        mode: str = "rendezvous",
        pace: float = 0.0,
    ) -> None:
        if mode not in RUNTIMES:
            raise ValueError(f"unknown DADAO runtime {mode!r}; choose one of {RUNTIMES}")
        self.comm, self.topo, self.grad_fn, self.mode, self.pace = comm, topo, grad_fn, mode, pace
        edges = undirected_edges(topo)
        rates = gossip_rates(topo) if rates is None else rates
        self.state = NodeState(x0, constants_for(topo, rates, mu, L))
        self.events = node_events(comm.rank, edges, rates, seed, t_max, grad_rate)
        self.t_max = t_max
        self.dropped: set[int] = set()
        self.gradients = self.gossips = self.skipped = 0
        self.bytes_to: dict[int, int] = {}
        self.messages_to: dict[int, int] = {}
        self.messages_from: dict[int, int] = {}
        self.on_time = self.late = 0
        self.late_time = 0.0
        """Mailbox: gossip updates applied at their event (the neighbour's message was already
        there), and applied later (`_settle`), with their summed delay in Poisson time."""
        self._grad_job: tuple[float, torch.Tensor, Future] | None = None
        """Mailbox: (t, nu X + Y~ at t, the background gradient of X(t)) while one is computed."""
        self.pending: dict[int, dict[int, tuple[float, torch.Tensor]]] = {}
        """Mailbox: peer -> {edge event k: (t_k, m_i sent at k)} awaiting the peer's message k."""
        self.seconds = self.drain_seconds = 0.0
        """Wall time of the events (after which x_i is final), then of waiting for the last sends
        and receives (mailbox: a slower neighbour's last messages)."""
        self.trace: list[tuple[float, torch.Tensor, int, int]] = []
        """(t, x_i(t), gradients, gossips so far) at each of run's `checkpoints`."""

    def run(
        self,
        stall: Callable[[int], None] | None = None,
        checkpoints: list[float] = (),
        start: float | None = None,
    ) -> NodeState:
        """Play every event; `stall(event_index)`: a test's hook to freeze this node;
        `checkpoints`: times at which to record the node's x into `self.trace` (read off the
        ODE between events: recording changes nothing); `start`: the wall-clock time
        (time.time()) at which Poisson time 0 begins, the same at every node (with a pace, nodes
        started apart would otherwise run skewed clocks; default: now)."""
        me, s = self.comm.rank, self.state
        marks = sorted(c for c in checkpoints if 0 <= c <= self.t_max)

        def record_until(t: float) -> None:
            while marks and marks[0] <= t:
                c = marks.pop(0)
                self.trace.append((c, s.peek(c), self.gradients, self.gossips))

        mailbox = outbox = None
        if start is not None and (wait := start - time.time()) > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        if self.mode == "mailbox":
            counts: dict[int, int] = {}
            for _t, peer, _k in self.events:
                if peer >= 0:
                    counts[peer] = counts.get(peer, 0) + 1
            mailbox = _Mailbox(self.comm, counts, s.P[2])
            outbox = _Outbox(self.comm)
            pool = ThreadPoolExecutor(1, thread_name_prefix=f"dadao-grad-{me}")
        for n_event, (t, peer, k) in enumerate(self.events):
            if self._grad_job is not None:  # own work, not a neighbour's: wait for it until due
                wait_futures(
                    [self._grad_job[2]], timeout=max(t0 + t * self.pace - time.perf_counter(), 0)
                )
                self._settle(mailbox)  # done: applied at its own time, exactly as inline
            if self.pace > 0 and (ahead := t0 + t * self.pace - time.perf_counter()) > 0:
                time.sleep(ahead)
            if stall is not None:
                stall(n_event)
            if mailbox is not None:
                self._settle(mailbox)
            record_until(t)
            if peer < 0 and mailbox is not None:
                if self._grad_job is not None:  # still computing the last one: this tick is lost
                    self.skipped += 1
                    continue
                s.ode(t)  # r = grad f_i(X) - (nu X + Y~), all at t; the gradient in the background
                base = s.c.nu * s.P[0] + s.P[3]
                self._grad_job = (t, base, pool.submit(self.grad_fn, me, s.P[0].clone()))
                continue
            if peer < 0:
                s.gradient(t, lambda x: self.grad_fn(me, x))
                self.gradients += 1
                continue
            if mailbox is not None and peer in mailbox.failed | outbox.failed:
                self.dropped.add(peer)
            if peer in self.dropped:
                continue
            mine = s.message(t)
            if outbox is not None:
                self._gossip_mailbox(mine, peer, k, mailbox, outbox)
            elif not self._gossip_rendezvous(mine, peer, k):
                continue
            self.bytes_to[peer] = self.bytes_to.get(peer, 0) + mine.numel() * mine.element_size()
            self.gossips += 1
        if mailbox is not None:
            pool.shutdown()  # waits for the last gradient, so that x_i(t_max) has it
            self._settle(mailbox)
        record_until(self.t_max)
        self.seconds = time.perf_counter() - t0
        if mailbox is not None:  # bounded: each wait ends by the group's timeout (docstring)
            outbox.join()
            mailbox.join()
            self._settle(mailbox)  # X no longer changes (X, X~ move only at gradient events)
            self.dropped |= mailbox.failed | outbox.failed
            self.messages_to, self.messages_from = outbox.sent, mailbox.received
        self.drain_seconds = time.perf_counter() - t0 - self.seconds
        return s

    def _gossip_rendezvous(self, mine: torch.Tensor, peer: int, k: int) -> bool:
        """Step 3 with the neighbour's message of this very event; False if the edge dropped."""
        theirs = torch.empty_like(mine)
        tag, me = k % 2**31, self.comm.rank
        try:  # lower rank sends first (in-order transports), both posted before any wait
            if me < peer:
                works = [self.comm.send(mine, dst=peer, tag=tag, async_op=True),
                         self.comm.recv(theirs, src=peer, tag=tag, async_op=True)]  # fmt: skip
            else:
                works = [self.comm.recv(theirs, src=peer, tag=tag, async_op=True),
                         self.comm.send(mine, dst=peer, tag=tag, async_op=True)]  # fmt: skip
            for w in works:
                w.wait()
        except RuntimeError:  # the neighbour stalled past the timeout, or died
            self.dropped.add(peer)
            return False
        self.messages_to[peer] = self.messages_to.get(peer, 0) + 1
        self.messages_from[peer] = self.messages_from.get(peer, 0) + 1
        self.state.gossip(mine, theirs)
        return True

    def _gossip_mailbox(
        self, mine: torch.Tensor, peer: int, k: int, mailbox: _Mailbox, outbox: _Outbox
    ) -> None:
        """Step 3 without waiting: send m_i; if m_j of this event is already here, apply the
        update now (as the rendezvous would), else keep m_i until it comes (`_settle`)."""
        outbox.send(mine, peer, k)
        theirs = mailbox.box[peer].pop(k, None)
        if theirs is not None:
            self.state.gossip(mine, theirs)
            self.on_time += 1
        else:
            self.pending.setdefault(peer, {})[k] = (self.state.t, mine)

    def _settle(self, mailbox: _Mailbox) -> None:
        """Apply the finished background gradient and every pending gossip update whose
        neighbour message has come, each as of its own event time (`_apply_late`)."""
        c = self.state.c
        if self._grad_job is not None and self._grad_job[2].done():
            t_g, base, future = self._grad_job
            r = future.result() - base
            self._apply_late(
                t_g, {0: -c.gamma * r, 1: -c.gamma_t * r, 3: (c.delta + c.delta_t) * r}
            )
            self._grad_job = None
            self.gradients += 1
        for peer, waiting in self.pending.items():
            box = mailbox.box[peer]
            for k in [k for k in waiting if k in box]:
                t_k, mine = waiting.pop(k)
                p = mine - box.pop(k)
                self._apply_late(t_k, {4: -c.beta * p, 5: -c.beta_t * p})
                self.late += 1
                self.late_time += self.state.t - t_k

    def _apply_late(self, t_k: float, rows: dict[int, torch.Tensor]) -> None:
        """Add an event's increment dP (its rows) made at t_k <= t: the ODE is linear, so adding
        expm(M (t - t_k)) dP now equals adding dP at t_k and letting the ODE run (only this
        node's events in between did not see it)."""
        s = self.state
        dP = torch.zeros_like(s.P)
        for row, v in rows.items():
            dP[row] = v
        s.P += torch.linalg.matrix_exp(s.c.M * (s.t - t_k)) @ dP


__all__ = [
    "RUNTIMES",
    "Constants",
    "DADAONode",
    "NodeState",
    "gossip_rates",
    "node_events",
    "simulate",
]
