"""A discrete-event simulator of lowband's techniques on networks too large to run here.

`lowband plan` (lowband.plan.cost) gives the steady state of one technique on one uniform network.
This module plays the same techniques step by step on N workers spread over sites, with per-worker
compute times that vary (stragglers) and workers that fail and come back, and reports what the
steady state hides: utilisation, bytes per worker, exposed communication and time to a token
budget, per technique and per N (where it stops scaling).

One source of truth: every synchronisation's seconds and bytes come from
`lowband.plan.cost.sync_costs`, the function `predict` uses, evaluated on the link of the group
that takes part (`Network.group_link`). With no stragglers and no failures the simulated step time
is `predict`'s, exactly (tests/test_simulate.py; CO2: in the steady state, see below).

The schedule, per technique (H = --sync-every, P = fragments, tau = overlap; DDP: H = P = 1,
DiLoCo: P = 1, tau = 0), is a sequence of rounds of H/P inner steps, as in
lowband.algorithms.diloco.StreamingDiLoCo:
  1. every worker runs H/P - tau inner steps, each of compute time t_c x X (X: the straggler draw,
     mean 1), on its own clock;
  2. the round's collective (fragment k mod P) starts when the last member has started it:
     S = max(clocks); it ends at E = S + sync_costs(...)[k mod P] seconds;
  3. every worker runs tau more inner steps (the overlap), then waits for E: clocks = max(clocks, E).
     With tau = 0 (DDP, DiLoCo) that is a barrier; exposed communication is how far E moves the
     slowest clock.
  4. a committed round adds (members at S) x H/P x batch x seq tokens.

Failures (lowband's elastic mode, docs/elastic.md): each worker alternates between up for an
exponential time (mean 1 / --failure-rate hours) and down for --recovery-s (a restart), a process
drawn once per seed and independent of the technique, so every technique meets the same failures.
Events (failure, recovery) sit in a heapq queue and are taken in time order between the steps above:
  - a worker that fails before its round's collective starts is left out of it (torchft's quorum):
    its steps since its last sync are lost, and the survivors' collective cannot start before
    the failure is detected, t_fail + --detect-s (lowband's --heartbeat-timeout);
  - a failure while a collective is in flight discards that round (should_commit is false; the
    fragment's local steps are rolled back, as lowband does): its tokens are lost and the members
    learn it at t_fail + --detect-s; the survivors go on without the failed worker;
  - a recovered worker joins at the next round's collective: it downloads the state from a live
    peer (same site if any; the model, AdamW moments and the technique's own state, `heal_bytes`:
    12 bytes per parameter for DDP, 20 for the DiLoCo family) at that pair's link speed, and every member
    stalls for the transfer (measured: the survivors' stall is 0.88-1.21x the ideal transfer,
    benchmarks/RESULTS.md, "Elastic recovery"). It contributes tokens from the round after.
So a failure costs its in-flight round (its own steps, or everyone's if it hits a collective),
a detection delay, and a heal transfer at the link's speed.

NoLoCo and the gossip rules have no collective over all workers: lowband.plan.simulate_groups
plays them on per-group and per-worker clocks.

CO2 (lowband.algorithms.co2, delay 1): round r's all-reduce, launched when the last member ends
round r (and has landed round r-1's), runs behind round r+1's H inner steps; at the end of round
r+1 each worker waits only for what is left of it (CO2._land_previous), then launches round r+1's.
So a round takes max(H t_c, s) in the steady state, `predict`'s; a run is one pipeline drain
longer, min(H t_c, s): the first round hides no reduction and the last one's is waited for
(CO2.close). A round's tokens count when its average lands. A failure while round r's average is
on the wire (most of the time, when s is close to H t_c) discards round r for everyone, known at
t_fail + --detect-s; round r+1's work goes on (the real algorithm applies no average and submits
round r+1's). A failure before the launch leaves the worker out, as above.

Federated rules (lowband.algorithms.federated): the rounds above with K local steps, but each
round's clients are drawn by the real `participants` (seed, round, live workers; `_Run.draw`),
the round starts when its drawn clients and the server (the lowest live rank) have arrived, and
lasts cost.star_exchange's seconds for the round's real uploaders (`_Run.collective`); every
worker then waits for the downlink. Its tokens are the drawn clients' (ADMM-NR: everyone's).

Links: a collective over a group takes the group's slowest pair (LinkMap.for_ranks): exact for a
ring whose every step waits for the slowest hop. With --hierarchical and sites, a collective is
instead the technique's collective inside each site on the intra link (G workers), then among the
S sites on the inter link, G rings in parallel each carrying 1/G of the data (modelled as the
inter link with G times the bandwidth); lowband's own collectives are flat, so this is a what-if.

Speed: compute is drawn per round as an (H/P, n) numpy array and summed; one Python iteration per
round, not per worker-step. Beyond --max-steps inner steps the rest of the budget is extrapolated
at the simulated rate (reported as such).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from lowband.comm import LinkSpec
from lowband.comm.link import LinkMap
from lowband.errors import ConfigError
from lowband.plan.cost import (
    FEDERATED,
    GOSSIP,
    Technique,
    Workload,
    clients_per_round,
    compute_passes,
    gossip_exchange,
    star_exchange,
    state_bytes,
    sync_costs,
)

# -- the network -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Network:
    """N workers and the link of any group of them: a flat link, or a LinkMap (sites, pairs)."""

    workers: int
    link: LinkSpec | None = None
    """Every worker behind this link (when `link_map` is None)."""
    link_map: LinkMap | None = None
    hierarchical: bool = False
    """With sites: reduce inside each site, then across sites (see the module docstring)."""

    def __post_init__(self) -> None:
        self._cache: dict = {}
        m = self.link_map
        self._by_site = (
            m is not None and not m.pairs and all(r in m.site_of for r in range(self.workers))
        )
        if m is not None:
            named = set(m.site_of) | {r for p in m.pairs for r in p}
            if any(r >= self.workers for r in named):
                raise ConfigError(f"{m.name}: names a worker beyond the {self.workers} simulated")
            if not self._by_site:
                m.for_ranks(range(min(self.workers, 64)))  # a missing link: one-line error now
        if self.hierarchical and not self._by_site:
            raise ConfigError("--hierarchical needs --sites (or a link map with sites, no pairs)")

    @classmethod
    def sites(cls, n: int, sites: int, intra: LinkSpec | None, inter: LinkSpec | None, **kw):
        """n workers split as evenly as possible over `sites` sites (consecutive ranks)."""
        groups = [list(map(int, g)) for g in np.array_split(np.arange(n), min(sites, n))]
        m = LinkMap(sites=groups, intra=intra, inter=inter, name="--sites")
        return cls(workers=n, link_map=m, **kw)

    def group_link(self, ranks) -> LinkSpec | None:
        """The link a collective over `ranks` sees: its slowest pair, as LinkMap.for_ranks."""
        if self.link_map is None:
            return self.link if len(ranks) > 1 else None
        if self._by_site:  # fast path, equal to for_ranks for a map of sites only
            if len(ranks) < 2:
                return None
            m = self.link_map
            return m.inter if len({m.site_of[r] for r in ranks}) > 1 else m.intra
        key = frozenset(ranks)
        if key not in self._cache:
            self._cache[key] = self.link_map.for_ranks(sorted(ranks))
        return self._cache[key]

    def heal_link(self, newcomer: int, alive) -> LinkSpec | None:
        """The link a recovering worker downloads its state over: from a live peer, the same
        site's when there is one."""
        if self.link_map is None:
            return self.link
        m = self.link_map
        if self._by_site:
            same = any(m.site_of[r] == m.site_of[newcomer] for r in alive)
            return m.intra if same else m.inter
        return m.between(newcomer, next(iter(alive)))

    def sync(self, w: Workload, t: Technique, ranks) -> list[tuple[float, float]]:
        """(seconds, bytes per worker) of each of the technique's collectives over `ranks`."""
        n = len(ranks)
        if not self.hierarchical:
            link = self.group_link(ranks)
            key = (w, t, n, link)
            if key not in self._cache:
                self._cache[key] = sync_costs(w, t, n, link)
            return self._cache[key]
        m = self.link_map
        per_site: dict[int, int] = {}
        for r in ranks:
            per_site[m.site_of[r]] = per_site.get(m.site_of[r], 0) + 1
        g, s = max(per_site.values()), len(per_site)
        key = (w, t, "h", g, s)
        if key not in self._cache:
            inside = sync_costs(w, t, g, m.intra)
            wide = None if m.inter is None else dataclasses.replace(
                m.inter, bandwidth_bps=m.inter.bandwidth_bps * g
            )  # fmt: skip
            across = sync_costs(w, t, s, wide)
            self._cache[key] = [(a[0] + b[0], a[1] + b[1] / g) for a, b in zip(inside, across)]
        return self._cache[key]

    def exchange(self, w: Workload, t: Technique, members) -> tuple[float, float]:
        """(seconds, bytes per member) of one NoLoCo group's exchange: cost.group_exchange (via
        sync_costs) for a group of len(members), the group's real size (the last group of an
        uneven split is larger), on the group's slowest pair. Point to point inside the group,
        so --hierarchical does not apply."""
        g = len(members)
        link = self.group_link(members)
        key = ("p2p", w, t, g, link)
        if key not in self._cache:
            ((secs, sent),) = sync_costs(w, dataclasses.replace(t, group_size=g), g, link)
            self._cache[key] = (secs, sent)
        return self._cache[key]

    def star(self, w: Workload, t: Technique, ranks, senders: int) -> tuple[float, float]:
        """(seconds, bytes all members send together) of one federated round over `ranks` in
        which `senders` drawn clients other than the server upload: cost.star_exchange, the
        function sync_costs uses, with the round's real draw instead of its expectation, on the
        group's slowest pair (the downlink reaches every member). Point to point: --hierarchical
        does not apply."""
        link = self.group_link(ranks)
        key = ("star", w, t, len(ranks), senders, link)
        if key not in self._cache:
            self._cache[key] = star_exchange(w.params, len(ranks), t, senders, link, w.transport)
        return self._cache[key]

    def gossip(self, w: Workload, t: Technique, members, seed: int):
        """One gossip round's graph over `members` (the round's group, in rank order, as
        lowband.algorithms.dpsgd builds it): (neighbours, seconds, bytes). `neighbours`: an
        (m, d + 1) index array, row i worker i and its in-neighbours (padded with i); `seconds`:
        each worker's gossip step on its slowest neighbour's link (cost.gossip_exchange's
        seconds over Q); `bytes`: the mean bytes a worker sends per round (gossip_exchange's).
        Only the latest membership is kept (it changes at every failure)."""
        key = ("gossip", w, t, tuple(members), seed)
        if self._cache.get("gossip_key") != key:
            m = len(members)
            nbrs = in_neighbours(t.topology, m, seed)
            d = max((len(x) for x in nbrs), default=0)
            index = np.array([[i, *x, *[i] * (d - len(x))] for i, x in enumerate(nbrs)], dtype=int)
            q = t.gossip_steps if t.algo == "dfedsam-mgs" else 1
            by_link: dict = {}
            secs = np.empty(m)
            for i, x in enumerate(nbrs):
                link = self.group_link([members[i], *(members[j] for j in x)])
                if link not in by_link:
                    by_link[link] = gossip_exchange(w.params, m, t, link, w.transport)[0] / q
                secs[i] = by_link[link]
            sent = gossip_exchange(w.params, m, t, self.group_link(members), w.transport)[1]
            self._cache["gossip_key"], self._cache["gossip"] = key, (index, secs, sent)
        return self._cache["gossip"]

    def heal_source(self, newcomer: int, alive) -> int:
        """The live peer a recovering worker downloads from: the same site's when there is one."""
        if self._by_site:
            site = self.link_map.site_of[newcomer]
            return next((r for r in alive if self.link_map.site_of[r] == site), alive[0])
        return alive[0]

    def describe(self) -> str:
        if self.link_map is None:
            return f"{self.workers} workers behind {self.link or 'no link'}"
        text = f"{self.workers} workers, {self.link_map}"
        return text + (", hierarchical collectives" if self.hierarchical else "")


# -- stragglers and failures ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Straggler:
    """Per-worker, per-step compute time = t_c x X, X i.i.d. with mean 1: `none`,
    `lognormal:SIGMA` (X = exp(N(-SIGMA^2/2, SIGMA^2))), or a file of measured step times (a JSON
    list or whitespace-separated seconds; X is drawn from them divided by their mean)."""

    kind: str = "none"
    sigma: float = 0.0
    ratios: tuple[float, ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> Straggler:
        if spec is None or spec.strip().lower() in ("", "none", "off", "0"):
            return cls()
        if spec.lower().startswith("lognormal:"):
            try:
                sigma = float(spec.split(":", 1)[1])
            except ValueError:
                sigma = -1.0
            if not 0.0 <= sigma <= 3.0:
                raise ConfigError(f"--straggler {spec!r}: SIGMA must be a number in [0, 3]")
            return cls("lognormal", sigma)
        path = Path(spec)
        try:
            text = path.read_text()
        except OSError:
            raise ConfigError(
                f"--straggler {spec!r}: expected none, lognormal:SIGMA or a file of step times"
            ) from None
        try:
            values = json.loads(text) if text.lstrip().startswith("[") else text.split()
            times = np.array([float(v) for v in values], dtype=float)
        except (ValueError, TypeError):
            raise ConfigError(f"--straggler {spec}: not a list of step times in seconds") from None
        if times.size < 2 or not np.all(np.isfinite(times)) or np.any(times <= 0):
            raise ConfigError(f"--straggler {spec}: needs at least 2 positive step times")
        return cls("measured", 0.0, tuple(times / times.mean()))

    def draw(self, rng: np.random.Generator, steps: int, n: int) -> np.ndarray:
        """Each of n workers' summed multiplier over `steps` inner steps."""
        if self.kind == "none" or steps == 0:
            return np.full(n, float(steps))
        if self.kind == "lognormal":
            x = rng.lognormal(-(self.sigma**2) / 2, self.sigma, size=(steps, n))
        else:
            x = rng.choice(np.asarray(self.ratios), size=(steps, n))
        return x.sum(axis=0)

    def __str__(self) -> str:
        if self.kind == "lognormal":
            return f"lognormal:{self.sigma:g}"
        if self.kind == "measured":
            return f"measured ({len(self.ratios)} step times, CV {np.std(self.ratios):.2f})"
        return "none"


@dataclasses.dataclass(frozen=True)
class Failures:
    rate_per_hour: float = 0.0
    """Failures per worker per hour of uptime (exponential times between them)."""
    recovery_s: float = 120.0
    """Down time of a failed worker before it comes back (a restart)."""
    detect_s: float = 5.0
    """How long the others take to notice a failure (lowband's --heartbeat-timeout default)."""


class _Events:
    """Each worker's failures and recoveries in time order (a heapq queue), drawn lazily from one
    generator in event order: the same for every technique at a seed."""

    def __init__(self, n: int, f: Failures, rng: np.random.Generator, fail_at=()) -> None:
        self.f, self.rng, self.heap, self.seq = f, rng, [], 0
        if f.rate_per_hour > 0:
            for w in range(n):
                self._push(self._up(), "fail", w)
        for when, w in fail_at:  # injected failures (tests): (seconds, worker)
            self._push(float(when), "fail", int(w))

    def _up(self) -> float:
        return float(self.rng.exponential(3600.0 / self.f.rate_per_hour))

    def _push(self, t: float, kind: str, w: int) -> None:
        heapq.heappush(self.heap, (t, self.seq, kind, w))
        self.seq += 1

    def next_time(self) -> float:
        return self.heap[0][0] if self.heap else math.inf

    def pop(self) -> tuple[float, str, int]:
        t, _, kind, w = heapq.heappop(self.heap)
        if kind == "fail":
            self._push(t + self.f.recovery_s, "recover", w)
        elif self.f.rate_per_hour > 0:
            self._push(t + self._up(), "fail", w)
        return t, kind, w


# -- the simulation -------------------------------------------------------------------------------


@dataclasses.dataclass
class SimResult:
    technique: Technique
    workers: int
    wall_s: float
    """Simulated wall-clock (to the budget, or to --max-steps)."""
    steps: int
    """Inner steps simulated (each worker's timeline)."""
    tokens: int
    """Tokens in committed rounds."""
    bytes_per_worker: float
    """Bytes each worker sent, averaged over the N workers (heal transfers included)."""
    exposed_s: float
    """Wall-clock the slowest worker spent waiting for collectives (and heals)."""
    failures: int
    discarded_rounds: int
    heal_s: float
    """Wall-clock every member stalled while recovered workers downloaded the state."""
    detect_s: float
    """Wall-clock collectives waited for failures to be detected."""
    time_to_budget_s: float
    extrapolated: bool
    """True when the run stopped early (--max-steps, --max-days) and the rest of the budget is
    extrapolated at the simulated rate."""
    stalled: bool
    """True when it stopped after `give_up_after` rounds in a row discarded by failures."""
    compute_s: float
    """t_c: the measured mean compute time of one inner step."""
    step_tokens: int

    @property
    def step_s(self) -> float:
        return self.wall_s / self.steps if self.steps else 0.0

    @property
    def utilisation(self) -> float:
        """Committed tokens / (N workers x wall x the measured rate): the share of the fleet's
        compute that went into the budget (stragglers' idle time, exposed communication and
        failures all lower it)."""
        rate = self.step_tokens / self.compute_s
        return self.tokens / (self.workers * self.wall_s * rate) if self.wall_s > 0 else 1.0

    def row(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "technique"}
        return {
            "technique": self.technique.label(),
            "flags": " ".join(self.technique.flags()),
            **out,
            "step_s": self.step_s,
            "utilisation": self.utilisation,
            "exposed_per_step_s": self.exposed_s / self.steps if self.steps else 0.0,
            "bytes_per_step": self.bytes_per_worker / self.steps if self.steps else 0.0,
        }


def heal_bytes(w: Workload, t: Technique) -> int:
    """The state a recovering worker downloads: fp32 parameters and AdamW's two moments (12 N),
    plus what the technique keeps beside them on a client (cost.state_bytes): the DiLoCo
    family's global copy and outer momentum or error buffer (8 N), a federated client's (12-32
    N), nothing for DDP and gossip."""
    return 12 * w.params + state_bytes(w, t, 0)


def in_neighbours(spec: str, n: int, seed: int) -> list[list[int]]:
    """Each node's in-neighbours (ascending) in --topology's graph over n nodes, as
    lowband.decentral.topology draws it (Topology.in_neighbours): its edge functions for the
    named graphs (erdos:P with `seed`), a file's mixing matrix otherwise. Without building the
    n x n mixing matrix for the named graphs (1,000 workers, every membership change)."""
    from lowband.decentral import topology as tp

    if spec in tp.KINDS or spec.startswith("erdos:"):
        tp.check_spec(spec)
        if spec.startswith("erdos:"):
            edges = tp.erdos_edges(n, float(spec.split(":", 1)[1]), seed)
        else:
            edges = {"ring": tp.ring_edges, "torus": tp.torus_edges,
                     "exponential": tp.exponential_edges, "complete": tp.complete_edges}[spec](n)  # fmt: skip
        out: list[set[int]] = [set() for _ in range(n)]
        for i, j in edges:
            out[i].add(j)
            out[j].add(i)
        return [sorted(x) for x in out]
    topo = tp.parse_topology(spec, n, seed)
    return [topo.in_neighbours(i) for i in range(n)]


def _period(t: Technique) -> tuple[int, int, int]:
    """(inner steps per round, fragments, tau)."""
    if t.algo not in ("ddp", "diloco", "streaming-diloco", "noloco", "co2", *FEDERATED, *GOSSIP):
        raise ConfigError(
            f"{t.label()}: the simulator plays DDP, the DiLoCo family, NoLoCo, CO2, the "
            "federated and the gossip rules"
        )
    if t.algo == "ddp":
        return 1, 1, 0
    if t.algo in ("noloco", "co2", *FEDERATED, *GOSSIP):
        return t.sync_every, 1, 0
    p = t.fragments if t.algo == "streaming-diloco" else 1
    tau = t.overlap if t.algo == "streaming-diloco" else 0
    if t.sync_every % p or t.sync_every < p:
        raise ConfigError(f"{t.label()}: H must be a multiple of P")
    if tau >= t.sync_every // p:
        raise ConfigError(f"{t.label()}: tau must be below H/P, as lowband train requires")
    return t.sync_every // p, p, tau


class _Run:
    """One technique's simulation: the live workers' clocks, the events, the counters."""

    def __init__(self, w, t, net, straggler, failures, seed, fail_at=()) -> None:
        self.w, self.t, self.net, self.straggler, self.f = w, t, net, straggler, failures
        # Two streams: compute draws, and the failure process (the same for every technique).
        compute_ss, fail_ss = np.random.SeedSequence(seed).spawn(2)
        self.rng = np.random.default_rng(compute_ss)
        self.events = _Events(net.workers, failures, np.random.default_rng(fail_ss), fail_at)
        self.ranks = list(range(net.workers))
        self.clocks = np.zeros(net.workers)
        self.pending: list[int] = []  # recovered, waiting for the next collective to join
        self.back_at: dict[int, float] = {}  # when each pending worker came back
        self.now = 0.0
        self.tc = w.compute_s * compute_passes(t)  # DFedSAM: SAM's two passes per step
        self.failed = self.discarded = 0
        self.sent = self.exposed = self.heal = self.detect = 0.0

    def advance(self, steps: int) -> None:
        self.clocks = self.clocks + self.tc * self.straggler.draw(self.rng, steps, len(self.ranks))

    def take(self, until: float) -> list[float]:
        """Apply every event before `until`; returns the times of live workers' failures."""
        failed = []
        while self.events.next_time() < until:
            when, kind, who = self.events.pop()
            self.now = when
            if kind == "recover":
                self.pending.append(who)
                self.back_at[who] = when
            elif who in self.pending:  # failed again before it joined
                self.pending.remove(who)
            else:
                self.failed += 1
                i = self.ranks.index(who)
                self.ranks.pop(i)
                self.clocks = np.delete(self.clocks, i)
                failed.append(when)
        return failed

    def restart_if_all_down(self) -> None:
        while not self.ranks:
            while not self.pending:
                self.take(self.events.next_time() + 1e-9)
            self.ranks, self.pending = [self.pending.pop(0)], self.pending
            self.clocks = np.array([self.now])

    def arrival(self, wait_for: set[int] | None = None) -> float:
        """When the round's collective can start: the last live worker's clock, or (a federated
        round, `wait_for` its drawn clients) the last of the drawn and the server's (the lowest
        live rank, rank 0 of the round's group)."""
        if not self.ranks:
            return self.now
        if wait_for is None:
            return float(self.clocks.max())
        server = min(self.ranks)
        return max(
            float(c) for r, c in zip(self.ranks, self.clocks) if r in wait_for or r == server
        )

    def start(self, wait_for: set[int] | None = None) -> tuple[float, list[int]]:
        """Steps 1-2: when the round's collective starts, leaving out the workers that failed
        before it (after their failure is detected); recovered workers heal and join. Returns
        the start and the members whose steps the round commits (not the joiners)."""
        hold = -math.inf
        while True:
            arrive = self.arrival(wait_for)
            start = max(arrive, hold)
            failed = self.take(start)
            if not failed:
                break
            hold = max(hold, max(failed) + self.f.detect_s)
        if not self.ranks:
            return start, []
        members = list(self.ranks)
        self.detect += max(0.0, hold - arrive)
        if self.pending:
            state = heal_bytes(self.w, self.t)
            links = [self.net.heal_link(j, self.ranks) for j in self.pending]
            heal = max(x.ideal_time(state, 1) if x else 0.0 for x in links)
            self.sent += state * len(self.pending)
            start += heal
            self.heal += heal
            self.exposed += heal
            self.clocks = np.concatenate(
                [np.maximum(self.clocks, start), np.full(len(self.pending), start)]
            )
            self.ranks, self.pending = self.ranks + self.pending, []
        return start, members

    def finish(self, end: float) -> bool:
        """Step 3's end: wait for the collective; False if a failure in flight discarded it."""
        failed = self.take(end)
        if failed:
            end = min(failed) + self.f.detect_s
            while self.events.next_time() < end:
                self.take(end)
        if self.ranks:
            slowest = float(self.clocks.max())
            self.clocks = np.maximum(self.clocks, end)
            self.exposed += max(0.0, end - slowest)
        if failed or not self.ranks:
            self.discarded += 1
            self.now = max(self.now, end)
            return False
        return True

    def draw(self, round_: int, seed: int) -> set[int] | None:
        """A federated round's clients: lowband.algorithms.federated.participants over the live
        workers, M = cost.clients_per_round of them (FederatedOptions.clients), from the seed and
        the round, as lowband train draws them. None (everyone) for the other techniques."""
        if self.t.algo not in FEDERATED:
            return None
        from lowband.algorithms.federated import participants

        live = sorted(self.ranks)
        return set(participants(live, clients_per_round(self.t, len(live)), seed, round_))

    def collective(self, k: int, frags: int, drawn, members) -> tuple[float, float, int]:
        """The round's collective over the live workers: (seconds, bytes all of them send, the
        workers whose steps it commits). A collective (`Network.sync`): fragment k mod P, every
        member's steps. A federated round (`Network.star`): the drawn clients still live at its
        start upload (all but the server, the lowest rank), the server sends x to the others;
        it commits the drawn clients' steps (ADMM-NR: every member's, as cost.contributing_workers)."""
        if drawn is None:
            secs, nbytes = self.net.sync(self.w, self.t, self.ranks)[k % frags]
            return secs, nbytes * len(self.ranks), len(members)
        clients = [r for r in members if r in drawn]
        senders = sum(1 for r in clients if r != min(members))
        secs, sent = self.net.star(self.w, self.t, self.ranks, senders)
        return secs, sent, len(members) if self.t.algo == "admm-nr" else len(clients)

    def _failures(
        self, until: Callable[[], float], on_recover: Callable[[int], object]
    ) -> Iterator[tuple[float, int]]:
        """The failures (time, worker) of workers not waiting to rejoin, up to `until()` (asked
        again after each event); a recovery queues the worker to rejoin and calls on_recover."""
        while self.events.next_time() < until():
            when, kind, who = self.events.pop()
            self.now = max(self.now, when)
            if kind == "recover":
                self.pending.append(who)
                self.back_at[who] = when
                on_recover(who)
            elif who in self.pending:  # failed again before it joined
                self.pending.remove(who)
            else:
                yield when, who


def simulate(
    w: Workload,
    t: Technique,
    net: Network,
    straggler: Straggler = Straggler(),
    failures: Failures = Failures(),
    seed: int = 0,
    max_steps: int = 200_000,
    max_wall_s: float = 90 * 86400.0,
    give_up_after: int = 1000,
    fail_at: tuple[tuple[float, int], ...] = (),
) -> SimResult:
    """Play technique `t` on `net` until w.tokens are committed. It stops early, and extrapolates
    the rest at the simulated rate, after `max_steps` inner steps or `max_wall_s` simulated
    seconds, or after `give_up_after` rounds in a row discarded by failures; with no token
    committed by then, the time to budget is infinite. `fail_at`: failures injected as (seconds, worker)."""
    from lowband.plan.simulate_groups import GroupRun, play_gossip, play_noloco  # imports this

    period, frags, tau = _period(t)
    groups = t.algo == "noloco" or t.algo in GOSSIP
    run = (GroupRun if groups else _Run)(w, t, net, straggler, failures, seed, fail_at)
    play = {"noloco": play_noloco, "co2": _play_co2}.get(t.algo, _play_rounds)
    if t.algo in GOSSIP:
        play = play_gossip
    tokens, step, lost_in_a_row = play(run, period, frags, tau, seed, max_steps, max_wall_s,
                                       give_up_after)  # fmt: skip
    wall = float(run.clocks.max()) if run.ranks else run.now
    extrapolated = tokens < w.tokens
    stalled = lost_in_a_row >= give_up_after
    if extrapolated and not tokens:
        to_budget = math.inf
    elif extrapolated:
        to_budget = wall * w.tokens / tokens
    else:
        to_budget = wall
    return SimResult(
        technique=t, workers=net.workers, wall_s=wall, steps=step, tokens=tokens,
        bytes_per_worker=run.sent / net.workers, exposed_s=run.exposed, failures=run.failed,
        discarded_rounds=run.discarded, heal_s=run.heal, detect_s=run.detect,
        time_to_budget_s=to_budget, extrapolated=extrapolated, stalled=stalled,
        compute_s=run.tc, step_tokens=w.step_tokens,
    )  # fmt: skip


def _go_on(run: _Run, tokens, step, lost, max_steps, max_wall_s, give_up_after) -> bool:
    if tokens >= run.w.tokens or step >= max_steps or lost >= give_up_after:
        return False
    return not (run.ranks and float(run.clocks.max()) > max_wall_s)


def _play_rounds(run: _Run, period, frags, tau, seed, *limits) -> tuple[int, int, int]:
    """DDP, the DiLoCo family and the federated rules: steps 1-4 of the module docstring (a
    federated round waits for its drawn clients and the server only, `_Run.draw`)."""
    w = run.w
    tokens = step = k = lost_in_a_row = 0
    while _go_on(run, tokens, step, lost_in_a_row, *limits):
        run.restart_if_all_down()
        drawn = run.draw(k + 1, seed)
        run.advance(period - tau)  # 1.
        start, members = run.start(drawn)  # 2.
        if not run.ranks:
            lost_in_a_row += 1
            continue
        secs, sent, counted = run.collective(k, frags, drawn, members)
        run.sent += sent
        run.advance(tau)  # 3.
        if run.finish(start + secs):
            tokens += counted * period * w.step_tokens  # 4.
            lost_in_a_row = 0
        else:
            lost_in_a_row += 1
        step += period
        k += 1
    return tokens, step, lost_in_a_row


def _play_co2(run: _Run, period, frags, tau, seed, *limits) -> tuple[int, int, int]:
    """CO2 with delay 1 (lowband.algorithms.co2): round r's all-reduce runs behind round r+1's
    compute; the end of round r+1 waits for it (the outer step applies it) and then launches
    round r+1's. A round's tokens count when its average lands; the last one is waited for at
    the end (CO2.close), so a run is one pipeline drain longer than the steady state."""
    w, t, net = run.w, run.t, run.net
    tokens = step = lost_in_a_row = 0
    pending: tuple[float, int] | None = None  # (end, members) of the reduction on the wire

    def land() -> None:
        nonlocal tokens, lost_in_a_row, pending
        end, members = pending
        pending = None
        if run.finish(end):  # a failure while it is on the wire discards the round
            tokens += members * period * w.step_tokens
            lost_in_a_row = 0
        else:
            lost_in_a_row += 1

    while _go_on(run, tokens, step, lost_in_a_row, *limits):
        if pending and tokens + pending[1] * period * w.step_tokens >= w.tokens:
            land()  # the budget is on the wire: CO2.close() waits for it
            continue
        run.restart_if_all_down()
        run.advance(period)  # round r+1's inner steps, round r's reduction in flight
        if pending:
            land()  # the outer step: wait for round r's average (_land_previous)
        start, members = run.start()  # launch round r+1's once the last member submits it
        step += period
        if not run.ranks:
            lost_in_a_row += 1
            continue
        secs, nbytes = net.sync(w, t, run.ranks)[0]
        run.sent += nbytes * len(run.ranks)
        pending = (start + secs, len(members))
    return tokens, step, lost_in_a_row
