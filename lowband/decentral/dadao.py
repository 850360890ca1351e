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

Runtime and deadlock freedom (`DADAONode.run`). Each node processes its own events (its gradient
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
(that depends on wall-clock), and anything under a real asynchronous runtime where a node would
proceed without its neighbour's message, which this one does not do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
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
class DADAONode:
    """Node `comm.rank` of the graph, playing its own events (module docstring: runtime)."""

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
    ) -> None:
        self.comm, self.topo, self.grad_fn = comm, topo, grad_fn
        edges = undirected_edges(topo)
        rates = gossip_rates(topo) if rates is None else rates
        self.state = NodeState(x0, constants_for(topo, rates, mu, L))
        self.events = node_events(comm.rank, edges, rates, seed, t_max, grad_rate)
        self.t_max = t_max
        self.dropped: set[int] = set()
        self.gradients = self.gossips = 0
        self.bytes_to: dict[int, int] = {}
        self.trace: list[tuple[float, torch.Tensor, int, int]] = []
        """(t, x_i(t), gradients, gossips so far) at each of run's `checkpoints`."""

    def run(
        self, stall: Callable[[int], None] | None = None, checkpoints: list[float] = ()
    ) -> NodeState:
        """Play every event; `stall(event_index)`: a test's hook to freeze this node;
        `checkpoints`: times at which to record the node's x into `self.trace` (read off the
        ODE between events: recording changes nothing)."""
        me, s = self.comm.rank, self.state
        marks = sorted(c for c in checkpoints if 0 <= c <= self.t_max)

        def record_until(t: float) -> None:
            while marks and marks[0] <= t:
                c = marks.pop(0)
                self.trace.append((c, s.peek(c), self.gradients, self.gossips))

        for n_event, (t, peer, k) in enumerate(self.events):
            record_until(t)
            if stall is not None:
                stall(n_event)
            if peer < 0:
                s.gradient(t, lambda x: self.grad_fn(me, x))
                self.gradients += 1
                continue
            if peer in self.dropped:
                continue
            mine = s.message(t)
            theirs = torch.empty_like(mine)
            tag = k % 2**31
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
                continue
            self.bytes_to[peer] = self.bytes_to.get(peer, 0) + mine.numel() * mine.element_size()
            s.gossip(mine, theirs)
            self.gossips += 1
        record_until(self.t_max)
        return s


__all__ = [
    "Constants",
    "DADAONode",
    "NodeState",
    "gossip_rates",
    "node_events",
    "simulate",
]
