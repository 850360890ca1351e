"""The cost model behind `lowband plan`: per technique, time per step, exposed communication,
utilisation, bytes per worker, memory per device and time to a token budget.

Every communication term is computed with the very functions that charge the emulated link
(lowband.comm.accounting for bytes and latency hops, LinkSpec.ideal_time for seconds), so the
predicted bytes are what `lowband train` counts, exactly, and the predicted seconds are what the
emulation sleeps, without jitter or loss. The compute term is measured, never assumed: a
per-worker rate in tokens/s (from `lowband probe`, a benchmark, or the user). docs/plan.md lists
every assumption; `Plan.assumptions` carries them into the output.

Per technique, with n workers, N parameters, t_c the compute time of one inner step and
t(op) = LinkSpec.ideal_time(critical bytes, hops) of a collective:
  ddp                 every step: all-reduce of N fp32 gradients, blocking: exposed = t(all-reduce)
  ddp --bits b        every step: the quantized all-reduce (all-to-all + all-gather of codec bytes)
  diloco H            every H steps: the quantized all-reduce of N values at `bits`, blocking
  streaming H,P,tau   every H/P steps one fragment (N/P values): its reduction overlaps tau inner
                      steps, so exposed = max(0, t(fragment) - tau t_c)
  sparseloco H,f,b    every H steps (per fragment with P): an all-gather of the top-k payloads
  federated K         every K local steps a star through rank 0 (lowband.algorithms.federated):
                      the M participants but the server send their payload (SCAFFOLD: 2 vectors;
                      SCALLION/SCAFCOM: the compressor's wire tensors), then the server sends x
                      (and c) to the n - 1 others; blocking. Bytes are the mean over workers,
                      M (n - 1) / n senders expected under partial participation
  gossip H,Q          every H steps Q gossip steps (lowband.algorithms.dpsgd): each worker sends
                      its codec payload to each neighbour of --topology's graph, blocking; a step
                      lasts as long as the busiest worker's (max degree) messages
Two measured terms join these when given (docs/plan.md, "The transport and the slowest worker"):
  transport           Workload.transport, the real transport's own time per collective (Gloo and
                      the Python inside lowband.comm, timed by `lowband probe` with the emulation
                      off, as a per-hop latency and a bandwidth): lowband.comm.Comm sleeps the
                      emulated link's time *after* the real collective completes, so a collective
                      takes t(op) + transport(op); a point-to-point message is stamped at issue,
                      so it takes the larger of the two
  stragglers          Workload.step_times, every worker's measured compute time of the same steps:
                      a sync waits for the slowest worker since the last one, wait = E[max_i -
                      mean_i] of the workers' compute over a sync period (only the persistent part,
                      the slowest worker's mean over the mean, where the reduction overlaps steps)
Utilisation = t_c / (t_c + wait + exposed per step); time to budget = steps x that step time.
DFedSAM's t_c is two passes (SAM's second gradient); a federated round's steps count for its M
participants only (the others' are discarded; ADMM-NR keeps them). DADAO (`lowband dadao`) is not
a candidate: it solves smooth strongly convex problems with exact gradients, not a model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from lowband.comm import LinkSpec, get_codec
from lowband.comm.accounting import (
    all_gather_traffic,
    all_reduce_traffic,
    all_to_all_traffic,
    p2p_traffic,
)
from lowband.comm.quantized import _chunk_numel
from lowband.comm.sparse import TopK


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is trained: parameters, shape, per-worker batch, the budget, and the measured rate."""

    params: int
    layers: int
    dim: int
    batch_size: int
    seq_len: int
    tokens: int
    tokens_per_s: float
    """Measured per-worker compute rate of one inner step at this batch (tokens/s)."""
    ffn_dim: int | None = None
    """The FFN (SwiGLU) width; None: 4 x dim."""
    model: Any = dataclasses.field(default=None, compare=False, repr=False)
    """The model on the meta device, when known (a preset): DDP's buckets and Streaming
    DiLoCo's fragments are then the ones `lowband train` makes, so bytes are exact."""
    transport: LinkSpec | None = None
    """The real transport's own time per collective, as a link (per-hop latency, bandwidth):
    measured by `lowband probe` with the link emulation off (timed all-reduces), or given
    (`lowband plan --transport`). Under lowband's emulation it comes on top of the emulated
    link's time (lowband.comm.Comm: end = real completion + link time). None: not counted."""
    quantized_transport: LinkSpec | None = None
    """The real transport's own time of the quantized all-reduce (an all-to-all, then an
    all-gather, with their host staging on a GPU), as a link over those two collectives' hops
    and bytes: `lowband probe` times it apart (docs/plan.md). Used for DiLoCo's, Streaming
    DiLoCo's, CO2's and quantized DDP's reductions; None: `transport` stands in."""
    step_times: tuple[tuple[float, ...], ...] | None = None
    """Measured compute seconds of the same steps on each worker (a row per worker, as many
    columns in each): `lowband probe` times them on all workers at once, benchmarks/plan_check.py
    reads every rank's metrics. Only their spread is used (`straggler_wait`, relative to their
    mean, times compute_s); None: every worker takes exactly compute_s."""

    def __post_init__(self) -> None:
        if self.step_times is not None:
            rows = tuple(tuple(float(x) for x in row) for row in self.step_times)
            if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
                raise ValueError("step_times needs one equally long, non-empty row per worker")
            if not all(x > 0 and math.isfinite(x) for r in rows for x in r):
                raise ValueError("step_times must be positive seconds")
            object.__setattr__(self, "step_times", rows)

    def ddp_buckets(self, cap_mb: float = 25.0) -> list[int]:
        """Element counts of DDP's gradient buckets (lowband.algorithms.ddp._buckets)."""
        if self.model is None:
            cap = int(cap_mb * 2**20) // 4
            return [min(cap, self.params - i) for i in range(0, self.params, cap)]
        from lowband.algorithms.ddp import _buckets

        params = [p for p in self.model.parameters() if p.requires_grad]
        return [sum(p.numel() for p in b) for b in _buckets(params, int(cap_mb * 2**20))]

    def fragment_numels(self, fragments: int) -> list[int]:
        """Element counts of Streaming DiLoCo's fragments (lowband.algorithms.diloco)."""
        if self.model is None:
            return [math.ceil(self.params / fragments)] * fragments
        from lowband.algorithms.fragments import strided_fragments

        return [sum(p.numel() for p in f) for f in strided_fragments(self.model, fragments)]

    @property
    def step_tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def compute_s(self) -> float:
        return self.step_tokens / self.tokens_per_s


FEDERATED = ("fedavg", "fedprox", "scaffold", "scallion", "scafcom", "admm-nr")
"""The federated rules (docs/federated.md): a star through rank 0 every K = --local-steps."""
GOSSIP = ("dpsgd", "dfedsam", "dfedsam-mgs")
"""The decentralized rules (docs/decentralized.md): gossip with the graph's neighbours."""
_NAMES = {
    "diloco": "DiLoCo", "streaming-diloco": "Streaming DiLoCo", "noloco": "NoLoCo", "co2": "CO2",
    "fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD", "scallion": "SCALLION",
    "scafcom": "SCAFCOM", "admm-nr": "ADMM-NR", "dpsgd": "D-PSGD", "dfedsam": "DFedSAM",
    "dfedsam-mgs": "DFedSAM-MGS",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Technique:
    """One candidate: an --algo and its knobs (the flags `lowband train` takes)."""

    algo: str
    sync_every: int = 1
    """Inner steps per round: H (--sync-every), or K (--local-steps) for a federated rule."""
    fragments: int = 1
    overlap: int = 0
    bits: int = 32
    compress: str | None = None
    group_size: int = 2
    """NoLoCo: replicas per gossip group."""
    participation: float = 1.0
    """Federated: the fraction of clients drawn per round (--participation)."""
    compressor: str | None = None
    """SCALLION/SCAFCOM: the uplink compressor (--compressor); None: the rule's default."""
    topology: str = "ring"
    """Gossip: the graph (--topology)."""
    gossip_steps: int = 1
    """DFedSAM-MGS: gossip steps per round, Q (--gossip-steps)."""
    options: tuple[str, ...] = ()
    """Further flags of the rule that change no byte (e.g. --server-opt adam), passed as given."""

    def flags(self) -> list[str]:
        if self.algo in FEDERATED:
            out = ["--algo", self.algo, "--local-steps", str(self.sync_every)]
            if self.participation != 1.0:
                out += ["--participation", str(self.participation)]
            if self.compressor:
                out += ["--compressor", self.compressor]
            return out + list(self.options)
        if self.algo in GOSSIP:
            out = ["--algo", self.algo, "--sync-every", str(self.sync_every)]
            out += ["--topology", self.topology]
            if self.algo == "dfedsam-mgs":
                out += ["--gossip-steps", str(self.gossip_steps)]
            if self.bits != 32:
                out += ["--bits", str(self.bits)]
            return out + list(self.options)
        out = ["--algo", self.algo]
        if self.algo != "ddp":
            out += ["--sync-every", str(self.sync_every)]
        if self.algo == "noloco":
            out += ["--group-size", str(self.group_size)]
        if self.algo == "streaming-diloco":
            out += ["--fragments", str(self.fragments), "--overlap", str(self.overlap)]
        if self.compress:
            out += ["--compress", self.compress]
        elif self.bits != 32 or self.algo == "streaming-diloco":
            out += ["--bits", str(self.bits)]
        return out

    def label(self) -> str:
        if self.algo == "ddp":
            return "DDP" + (f" {self.bits}-bit" if self.bits != 32 else "")
        name = _NAMES[self.algo]
        if self.algo in FEDERATED:
            knobs = [f"K={self.sync_every}"]
            if self.participation != 1.0:
                knobs.append(f"{100 * self.participation:g}% of clients")
            if self.algo in ("scallion", "scafcom"):
                knobs.append(uplink_compressor(self))
            return f"{name} " + ", ".join(knobs)
        if self.algo in GOSSIP:
            knobs = [f"H={self.sync_every}", self.topology]
            if self.algo == "dfedsam-mgs":
                knobs.append(f"Q={self.gossip_steps}")
            return f"{name} " + ", ".join([*knobs, f"{self.bits}-bit"])
        knobs = [f"H={self.sync_every}"]
        if self.algo == "noloco":
            knobs.append(f"g={self.group_size}")
        if self.algo == "streaming-diloco":
            knobs += [f"P={self.fragments}", f"tau={self.overlap}"]
        knobs.append(f"sparse {self.compress[5:]}" if self.compress else f"{self.bits}-bit")
        return f"{name} " + ", ".join(knobs)


@dataclasses.dataclass
class Prediction:
    technique: Technique
    step_s: float
    """Mean wall-clock per inner step (compute + exposed communication)."""
    exposed_s: float
    """Mean exposed communication per inner step."""
    sync_s: float
    """One synchronisation's communication time (a fragment's, with P > 1)."""
    bytes_per_step: float
    """Mean bytes each worker sends per inner step."""
    utilisation: float
    memory_bytes: int
    time_to_budget_s: float
    steps: int
    straggler_s: float = 0.0
    """Mean wait per inner step for the slowest worker (Workload.step_times; 0 without)."""

    def row(self) -> dict[str, Any]:
        return {
            "technique": self.technique.label(),
            "flags": " ".join(self.technique.flags()),
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "technique"},
        }


def _t(link: LinkSpec | None, traffic) -> float:
    return 0.0 if link is None else link.ideal_time(traffic.critical_bytes, traffic.rounds)


def _collective(link: LinkSpec | None, transport: LinkSpec | None, traffic) -> float:
    """One blocking collective's seconds: the real transport's time, then the emulated link's
    (lowband.comm.Comm starts the link's time when the real operation has completed)."""
    return _t(link, traffic) + _t(transport, traffic)


def _message(link: LinkSpec | None, transport: LinkSpec | None, nbytes: float, hops: int) -> float:
    """Point-to-point messages' seconds: the emulation stamps a message's arrival when it is
    issued (lowband.comm.Comm), so the real transfer hides under the link's time unless it is
    longer: the larger of the two."""
    return max(
        0.0 if link is None else link.ideal_time(nbytes, hops),
        0.0 if transport is None else transport.ideal_time(nbytes, hops),
    )


def _persistent(y: np.ndarray) -> float:
    """How much longer the slowest worker's steps are than the mean, per step, from step times
    y (workers x steps): the slowest worker of each half of the steps, timed on the other half
    (the mean of both ways), so that a worker the noise made slowest in one half counts for what
    it is in the other. With one step: the plain max - mean."""
    steps = y.shape[1]
    if steps < 2:
        mu = y.mean(axis=1)
        return float(mu.max() - mu.mean())
    h = steps // 2
    a, b = y[:, :h].mean(axis=1), y[:, h : 2 * h].mean(axis=1)
    return max(0.0, 0.5 * float(b[a.argmax()] - b.mean() + a[b.argmax()] - a.mean()))


def straggler_wait(
    step_times, n: int, k: int, overlapped: bool = False, group: int | None = None
) -> float:
    """Mean wait of a worker for the slowest one, per sync period of k inner steps, as a fraction
    of the mean step time, from measured per-worker step times (rows: workers, columns: the same
    steps). Worker j of n behaves as measured row j mod m (more workers than measured repeat
    them). The workers sync in one group, or in groups of `group` (NoLoCo: consecutive workers,
    the last group taking the remainder). Per group of workers G:
      blocking     E over whole windows of k steps of (max_G - mean_G) of the workers' compute in
                   the window: the persistent part (a worker slower on average) and the random part
                   (which worker is slow changes); with fewer than k measured steps, the
                   persistent part times k plus the one-step random part times sqrt(k) (an
                   extrapolation: it takes the steps as independent)
      overlapped   the persistent part only, k x (max_G - mean_G) of the workers' means: a worker
                   ahead waits for the slowest in the long run, a random delay is absorbed by the
                   overlap (Streaming DiLoCo's tau steps, CO2's round)
    The mean over workers of (their group's slowest - their own), over the mean step time. The
    persistent part is cross-validated (`_persistent`), so that noise is not taken for a slow
    worker."""
    x = np.asarray(step_times, dtype=float)
    if n <= 1 or k < 1:
        return 0.0
    m, steps = x.shape
    rows = [j % m for j in range(n)]
    g = n if group is None else max(1, min(group, n))
    cut = (n // g - 1) * g
    groups = [rows[i : i + g] for i in range(0, cut, g)] + [rows[cut:]]
    total = 0.0
    for members in groups:
        if len(members) < 2:
            continue
        y = x[members]
        persistent = _persistent(y)
        if overlapped:
            wait = k * persistent
        elif steps >= k:
            windows = steps // k
            sums = y[:, : windows * k].reshape(len(members), windows, k).sum(axis=2)
            wait = float((sums.max(axis=0) - sums.mean(axis=0)).mean())
        else:
            one = float((y.max(axis=0) - y.mean(axis=0)).mean())
            wait = k * persistent + math.sqrt(k) * max(0.0, one - persistent)
        total += len(members) * wait
    return float(total / n / x[rows].mean())


def quantized_reduce(
    numel: int, n: int, bits: int, link: LinkSpec | None, transport: LinkSpec | None = None
) -> tuple[float, int]:
    """(seconds, bytes sent) of lowband.comm.quantized_all_reduce: an all-to-all then an
    all-gather, each of (n - 1) codec payloads, one after the other (each its transport's time,
    then its link's)."""
    if n == 1:
        return 0.0, 0
    a2a, ag = quantized_reduce_traffic(numel, n, bits)
    return _collective(link, transport, a2a) + _collective(link, transport, ag), a2a.sent + ag.sent


def quantized_reduce_traffic(numel: int, n: int, bits: int) -> tuple:
    """The Traffic of quantized_all_reduce's all-to-all and all-gather (rank 0's)."""
    codec = get_codec(bits)
    payload = codec.payload_bytes(_chunk_numel(numel, n, codec))
    return all_to_all_traffic(n * payload, 1, 0, n), all_gather_traffic(payload, 1, 0, n)


def sparse_gather(
    numel: int, n: int, spec: str, link: LinkSpec | None, transport: LinkSpec | None = None
) -> tuple[float, int]:
    """(seconds, bytes sent) of SparseLoCo's exchange: the all-gather of top-k payloads, or, in a
    group large enough that it costs less, the dense fp32 all-reduce (TopK.exchange)."""
    if n == 1:
        return 0.0, 0
    topk = TopK.parse(spec)
    if topk.exchange(numel, n) == "dense":
        return quantized_reduce(numel, n, 32, link, transport)
    payload = topk.payload_bytes(numel)
    traffic = all_gather_traffic(payload, 1, 0, n)
    return _collective(link, transport, traffic), traffic.sent


def group_exchange(
    numel: int, n: int, t: Technique, link: LinkSpec | None, transport: LinkSpec | None = None
) -> tuple[float, int]:
    """(seconds, bytes sent) of one NoLoCo round: the codec payload of the parameters sent point
    to point to each of the other g - 1 members of the worker's group (the last group of an
    uneven split is larger: this is the common case). The messages leave one after another on the
    uplink and arrive a latency later (lowband.comm's message model)."""
    g = min(t.group_size, n)
    if g <= 1:
        return 0.0, 0
    codec = get_codec(t.bits)
    payload = codec.payload_bytes(numel)
    seconds = 0.0
    if link is not None:
        seconds = link.ideal_time((g - 1) * payload, 0) + link.ideal_time(0, 1)
    if transport is not None:
        seconds = max(seconds, _message(None, transport, (g - 1) * payload, 1))
    return seconds, (g - 1) * payload


def uplink_compressor(t: Technique) -> str:
    """SCALLION/SCAFCOM's --compressor: the technique's, else the rule's own default."""
    if t.compressor:
        return t.compressor
    from lowband.algorithms.scaffold import ScafcomOptions, ScallionOptions

    return (ScafcomOptions if t.algo == "scafcom" else ScallionOptions)().compressor


def _p2p_bytes(tensors) -> int:
    return sum(p2p_traffic(x.numel(), x.element_size(), sending=True).sent for x in tensors)


def star_payloads(numel: int, t: Technique) -> tuple[int, int]:
    """(uplink bytes of one participant, downlink bytes to one client) of a federated round, as
    lowband.algorithms.federated sends them: one fp32 vector up (FedAvg, FedProx, ADMM-NR), two
    (SCAFFOLD: y - x and dc), or the compressor's wire tensors (SCALLION, SCAFCOM: its own
    `wire_like`, built on the meta device); x down, and c with it for the SCAFFOLD family."""
    import torch

    with torch.device("meta"):
        if t.algo in ("scallion", "scafcom"):
            from lowband.algorithms.scaffold import get_compressor

            up = get_compressor(uplink_compressor(t)).wire_like(numel)
        else:
            up = [torch.empty(numel)] * (2 if t.algo == "scaffold" else 1)
        down = [torch.empty(numel)] * (1 if t.algo in ("fedavg", "fedprox", "admm-nr") else 2)
    return _p2p_bytes(up), _p2p_bytes(down)


def clients_per_round(t: Technique, n: int) -> int:
    """M, the participants of a round among n clients (FederatedOptions.clients)."""
    from lowband.algorithms.federated import FederatedOptions

    return FederatedOptions(participation=t.participation).clients(n)


def star_exchange(
    numel: int,
    n: int,
    t: Technique,
    senders: float,
    link: LinkSpec | None,
    transport: LinkSpec | None = None,
) -> tuple[float, float]:
    """(seconds, bytes sent by all n workers together) of one federated round in which `senders`
    participants other than the server (rank 0) upload. Each sends its payload's tensors one after
    another, and they queue on the server's downlink (lowband.comm's message model): a latency
    plus every upload's bytes; then the server sends x (and c) to the n - 1 others one after
    another on its uplink: a latency plus (n - 1) downlinks' bytes."""
    if n == 1:
        return 0.0, 0.0
    up, down = star_payloads(numel, t)
    seconds = 0.0
    if link is not None or transport is not None:
        seconds = _message(link, transport, senders * up, 1) + _message(
            link, transport, (n - 1) * down, 1
        )
    return seconds, senders * up + (n - 1) * down


def gossip_exchange(
    numel: int, n: int, t: Technique, link: LinkSpec | None, transport: LinkSpec | None = None
) -> tuple[float, float]:
    """(seconds, mean bytes a worker sends) of one round of D-PSGD / DFedSAM / DFedSAM-MGS: Q
    gossip steps, each sending the worker's payload (its fp32 parameters at 32 bits, else the
    codec's) once to each out-neighbour of the graph lowband.decentral.topology builds over n
    workers (seed 0 for erdos:P). A step waits for every neighbour: its messages leave one after
    another on the uplink and queue on the receivers' downlinks, so it lasts a latency plus the
    largest degree's payloads."""
    if n == 1:
        return 0.0, 0.0
    outs, degree = graph_degrees(t.topology, n)
    payload = gossip_payload(numel, t)
    q = t.gossip_steps if t.algo == "dfedsam-mgs" else 1
    seconds = q * _message(link, transport, degree * payload, 1)
    return seconds, q * sum(outs) * payload / n


def gossip_payload(numel: int, t: Technique) -> int:
    """Bytes of one gossip message: the fp32 parameters at 32 bits, else the codec's payload."""
    return 4 * numel if t.bits == 32 else get_codec(t.bits).payload_bytes(numel)


@functools.lru_cache(maxsize=64)
def graph_degrees(spec: str, n: int) -> tuple[tuple[int, ...], int]:
    """(each node's out-degree, the largest in- or out-degree) of --topology's graph over n
    workers: the edges lowband.decentral.topology draws (Metropolis weights are positive on
    every edge; erdos:P with seed 0), or a file's mixing matrix."""
    from lowband.decentral import topology as tp

    if spec in tp.KINDS or spec.startswith("erdos:"):
        tp.check_spec(spec)
        if spec.startswith("erdos:"):
            edges = tp.erdos_edges(n, float(spec.split(":", 1)[1]), 0)
        else:
            edges = {"ring": tp.ring_edges, "torus": tp.torus_edges,
                     "exponential": tp.exponential_edges, "complete": tp.complete_edges}[spec](n)  # fmt: skip
        deg = [0] * n
        for i, j in edges:
            deg[i] += 1
            deg[j] += 1
        return tuple(deg), max(deg)
    link = tp.parse_topology(spec, n, 0).W > 0
    link.fill_diagonal_(False)  # W[i, j] > 0: j's model goes to i
    outs, ins = link.sum(0).tolist(), link.sum(1).tolist()
    return tuple(int(x) for x in outs), int(max(max(outs), max(ins)))


def compute_passes(t: Technique) -> int:
    """Forward and backward passes per inner step: 2 for DFedSAM (SAM's second gradient, at the
    perturbed point), else 1."""
    return 2 if t.algo in ("dfedsam", "dfedsam-mgs") else 1


def contributing_workers(t: Technique, n: int) -> int:
    """Workers whose steps count towards the budget: a federated round keeps only its M
    participants' local steps (ADMM-NR keeps every client's), every other technique all n."""
    if t.algo in FEDERATED and t.algo != "admm-nr":
        return clients_per_round(t, n)
    return n


def state_bytes(w: Workload, t: Technique, n: int) -> int:
    """Bytes a technique keeps beside the model and AdamW (the largest worker's): the DiLoCo
    family's outer copy and momentum or error buffer (8 N); a federated worker's x, the round's
    gradient sum and last gradient (12 N), + c and c_i (SCAFFOLD family, 8 N), + the server's
    Adam moments (SCALLION/SCAFCOM, 8 N, allocated everywhere), + SCAFCOM's momentum v (4 N);
    ADMM-NR's anchor, two copies of z, last gradient and local model (20 N) and, on the server,
    every client's last payload (4 N n). Gossip keeps nothing between rounds."""
    if t.algo == "ddp" or t.algo in GOSSIP:
        return 0
    if t.algo not in FEDERATED:
        return 8 * w.params
    per = {"fedavg": 12, "fedprox": 12, "scaffold": 20, "scallion": 28, "scafcom": 32}
    if t.algo == "admm-nr":
        return (32 + 4 * n) * w.params
    return per[t.algo] * w.params


ACTIVATION_BYTES = (27.6, 9.28)
"""Bytes kept for the backward pass per token and layer, per unit of width and of FFN width, of
lowband's block (RMSNorm, GQA attention, SwiGLU) in an eager bf16-autocast step: fitted to 7
peaks on an H200 (125m, 350m, 1b; batch x seq 4k-16k tokens; benchmarks/RESULTS.md, "the plan's
memory term, refitted"), all within 1.5%."""
COMPILED_ACTIVATIONS = 0.64
"""torch.compile's fused blocks keep this share of the eager step's activations (2 peaks)."""


def memory_bytes(w: Workload, t: Technique, compiled: bool = True, n: int = 1) -> int:
    """Peak device memory of one training step, as `lowband train` runs it on a GPU (compiled
    blocks by default): fp32 parameters and AdamW moments (12 N), + the technique's own state
    (`state_bytes`), then the larger of the forward's peak (autocast's bf16 weight copies, 2 N,
    plus the activations ACTIVATION_BYTES per token and layer) and the gradients' (4 N, after the
    activations are freed); for gossip also the exchange's (the gradients, a flat copy and the
    weighted sum, 12 N, plus the neighbours' payloads)."""
    state = 12 * w.params + state_bytes(w, t, n)
    ffn = w.ffn_dim if w.ffn_dim is not None else 4 * w.dim
    per_token_layer = ACTIVATION_BYTES[0] * w.dim + ACTIVATION_BYTES[1] * ffn
    activations = per_token_layer * w.batch_size * w.seq_len * w.layers
    if compiled:
        activations *= COMPILED_ACTIVATIONS
    peak = max(2 * w.params + activations, 4 * w.params)
    if t.algo in GOSSIP and n > 1:
        degree, payload = graph_degrees(t.topology, n)[1], gossip_payload(w.params, t)
        own = 0 if t.bits == 32 else payload  # at 32 bits the flat copy itself is sent
        peak = max(peak, 12 * w.params + own + degree * payload)
    return int(state + peak)


def sync_costs(
    w: Workload, t: Technique, n: int, link: LinkSpec | None
) -> list[tuple[float, float]]:
    """(seconds, bytes each worker sends) of each synchronisation in one period of `t`: DDP's one
    all-reduce per step, DiLoCo's one per H steps, Streaming DiLoCo's one per fragment, a
    federated rule's star round every K steps (bytes: the mean over the n workers, as
    `lowband train`'s summary reports them; the server sends most), a gossip round every H steps
    (the mean over workers: degrees may differ). Seconds include w.transport (w.quantized_transport for a quantized all-reduce) where given. The
    single source of these numbers for `predict` and the simulator (lowband.plan.simulate)."""
    tr = w.transport
    if t.algo == "ddp":
        if n == 1:
            return [(0.0, 0)]
        if t.bits == 32:  # every bucket issued, then waited: they queue on the uplink
            traffic = [all_reduce_traffic(b, 4, 0, n) for b in w.ddp_buckets()]
            # The transport runs the buckets one after another; each bucket's emulated link time
            # starts when its real transfer is done and the previous bucket's link time is over.
            done = end = 0.0
            for x in traffic:
                done += _t(tr, x)
                end = max(done, end) + _t(link, x)
            return [(end, sum(x.sent for x in traffic))]
        return [quantized_reduce(w.params, n, t.bits, link, w.quantized_transport or tr)]
    if t.algo == "noloco":
        return [group_exchange(w.params, n, t, link, tr)]
    if t.algo in FEDERATED:  # expected senders besides the server: M (n - 1) / n
        senders = clients_per_round(t, n) * (n - 1) / n
        seconds, sent = star_exchange(w.params, n, t, senders, link, tr)
        return [(seconds, sent / n)]
    if t.algo in GOSSIP:
        return [gossip_exchange(w.params, n, t, link, tr)]
    p = t.fragments if t.algo == "streaming-diloco" else 1
    if t.compress:
        return [sparse_gather(numel, n, t.compress, link, tr) for numel in w.fragment_numels(p)]
    qtr = w.quantized_transport or tr
    return [quantized_reduce(numel, n, t.bits, link, qtr) for numel in w.fragment_numels(p)]


def sync_period(t: Technique) -> tuple[int, bool, int | None]:
    """(inner steps between a worker's syncs, whether the sync overlaps inner steps, the group
    size a sync waits for (None: all workers)): DDP 1; Streaming DiLoCo H/P, overlapped when
    tau > 0; CO2 H, overlapped (the next round); NoLoCo H in groups of g; every other H or K."""
    if t.algo == "ddp":
        return 1, False, None
    if t.algo == "streaming-diloco":
        return max(1, t.sync_every // t.fragments), t.overlap > 0, None
    if t.algo == "co2":
        return t.sync_every, True, None
    return t.sync_every, False, t.group_size if t.algo == "noloco" else None


def predict(w: Workload, t: Technique, n: int, link: LinkSpec | None) -> Prediction:
    tc = w.compute_s * compute_passes(t)
    costs = sync_costs(w, t, n, link)
    if t.algo == "ddp":
        ((sync_s, sent),) = costs
        exposed, per_step = sync_s, float(sent)
    else:
        times, sents = [c[0] for c in costs], [c[1] for c in costs]
        sync_s = max(times)
        # a fragment's reduction runs during tau inner steps; CO2's during the whole next round
        hidden = (t.sync_every if t.algo == "co2" else t.overlap) * tc
        exposed = sum(max(0.0, x - hidden) for x in times) / t.sync_every
        per_step = sum(sents) / t.sync_every
    wait = 0.0
    if w.step_times is not None:
        k, overlapped, group = sync_period(t)
        wait = tc * straggler_wait(w.step_times, n, k, overlapped, group) / k
    step_s = tc + wait + exposed
    steps = math.ceil(w.tokens / (contributing_workers(t, n) * w.step_tokens))
    return Prediction(
        technique=t,
        step_s=step_s,
        exposed_s=exposed,
        sync_s=sync_s,
        bytes_per_step=per_step,
        utilisation=tc / step_s if step_s > 0 else 1.0,
        memory_bytes=memory_bytes(w, t, n=n),
        time_to_budget_s=steps * step_s,
        steps=steps,
        straggler_s=wait,
    )


FEDERATED_CANDIDATES = (
    Technique("fedavg"),
    Technique("fedprox", options=("--mu", "0.01")),
    Technique("scaffold"),
    Technique("scallion", compressor="randk:0.05",
              options=("--cv-scale", "0.05", "--server-opt", "adam", "--local-lr", "0.003")),
    Technique("scafcom", compressor="topk:0.05",
              options=("--beta", "1.0", "--server-opt", "adam", "--local-lr", "0.003")),
    Technique("admm-nr", options=("--rho", "10", "--grad-estimate", "mean")),
)  # fmt: skip
"""The federated rules as benchmarks/RESULTS.md measured them (its loss gaps are theirs), full
participation; K is set per candidate."""
GOSSIP_CANDIDATES = tuple(
    Technique(algo, topology=topo, bits=16, gossip_steps=4 if algo == "dfedsam-mgs" else 1)
    for algo in GOSSIP
    for topo in ("ring", "exponential")
)
"""D-PSGD, DFedSAM and DFedSAM-MGS (Q = 4) on a ring and an exponential graph, bf16 on the wire
(docs/decentralized.md: 16 bits is the sensible floor); H is set per candidate."""


def candidates(bits_choices=(32, 4), h_choices=(1, 30, 100, 500)) -> list[Technique]:
    """The techniques `lowband plan` ranks: DDP (fp32 and 8-bit), DiLoCo and Streaming DiLoCo at
    several H and bits, SparseLoCo at 1% / 2 bits, NoLoCo (groups of 2, bf16), CO2 (4-bit), the
    six federated rules (full participation) and the three gossip rules (ring and exponential,
    bf16), each at every H."""
    out = [Technique("ddp"), Technique("ddp", bits=8)]
    for h in h_choices:
        if h == 1:
            continue
        for b in bits_choices:
            out.append(Technique("diloco", sync_every=h, bits=b))
        p = 4 if h % 4 == 0 else 2 if h % 2 == 0 else 1
        if p > 1:
            tau = max(1, min(h // p - 1, h // (2 * p)))
            out.append(Technique("streaming-diloco", h, p, tau, bits=4))
            out.append(Technique("streaming-diloco", h, p, tau, compress="topk:0.01:2"))
        out.append(Technique("diloco", sync_every=h, compress="topk:0.01:2"))
        out.append(Technique("noloco", sync_every=h, bits=16))
        out.append(Technique("co2", sync_every=h, bits=4))
        out += [dataclasses.replace(t, sync_every=h) for t in FEDERATED_CANDIDATES]
        out += [dataclasses.replace(t, sync_every=h) for t in GOSSIP_CANDIDATES]
    return out
