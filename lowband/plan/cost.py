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
Utilisation = t_c / (t_c + exposed per step); time to budget = steps x (t_c + exposed per step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lowband.comm import LinkSpec, get_codec
from lowband.comm.accounting import all_gather_traffic, all_reduce_traffic, all_to_all_traffic
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


@dataclasses.dataclass(frozen=True)
class Technique:
    """One candidate: an --algo and its knobs (the flags `lowband train` takes)."""

    algo: str
    sync_every: int = 1
    fragments: int = 1
    overlap: int = 0
    bits: int = 32
    compress: str | None = None
    group_size: int = 2
    """NoLoCo: replicas per gossip group."""

    def flags(self) -> list[str]:
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
        name = {
            "diloco": "DiLoCo", "streaming-diloco": "Streaming DiLoCo", "noloco": "NoLoCo",
            "co2": "CO2",
        }[self.algo]  # fmt: skip
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

    def row(self) -> dict[str, Any]:
        return {
            "technique": self.technique.label(),
            "flags": " ".join(self.technique.flags()),
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "technique"},
        }


def _t(link: LinkSpec | None, traffic) -> float:
    return 0.0 if link is None else link.ideal_time(traffic.critical_bytes, traffic.rounds)


def quantized_reduce(numel: int, n: int, bits: int, link: LinkSpec | None) -> tuple[float, int]:
    """(seconds, bytes sent) of lowband.comm.quantized_all_reduce: an all-to-all then an
    all-gather, each of (n - 1) codec payloads."""
    if n == 1:
        return 0.0, 0
    codec = get_codec(bits)
    payload = codec.payload_bytes(_chunk_numel(numel, n, codec))
    a2a = all_to_all_traffic(n * payload, 1, 0, n)
    ag = all_gather_traffic(payload, 1, 0, n)
    return _t(link, a2a) + _t(link, ag), a2a.sent + ag.sent


def sparse_gather(numel: int, n: int, spec: str, link: LinkSpec | None) -> tuple[float, int]:
    """(seconds, bytes sent) of SparseLoCo's exchange: the all-gather of top-k payloads, or, in a
    group large enough that it costs less, the dense fp32 all-reduce (TopK.exchange)."""
    if n == 1:
        return 0.0, 0
    topk = TopK.parse(spec)
    if topk.exchange(numel, n) == "dense":
        return quantized_reduce(numel, n, 32, link)
    payload = topk.payload_bytes(numel)
    traffic = all_gather_traffic(payload, 1, 0, n)
    return _t(link, traffic), traffic.sent


def group_exchange(numel: int, n: int, t: Technique, link: LinkSpec | None) -> tuple[float, int]:
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
    return seconds, (g - 1) * payload


ACTIVATION_BYTES = (27.6, 9.28)
"""Bytes kept for the backward pass per token and layer, per unit of width and of FFN width, of
lowband's block (RMSNorm, GQA attention, SwiGLU) in an eager bf16-autocast step: fitted to 7
peaks on an H200 (125m, 350m, 1b; batch x seq 4k-16k tokens; benchmarks/RESULTS.md, "the plan's
memory term, refitted"), all within 1.5%."""
COMPILED_ACTIVATIONS = 0.64
"""torch.compile's fused blocks keep this share of the eager step's activations (2 peaks)."""


def memory_bytes(w: Workload, t: Technique, compiled: bool = True) -> int:
    """Peak device memory of one training step, as `lowband train` runs it on a GPU (compiled
    blocks by default): fp32 parameters and AdamW moments (12 N), +8 N for the DiLoCo family's
    outer copy and momentum or error buffer, then the larger of the forward's peak (autocast's
    bf16 weight copies, 2 N, plus the activations ACTIVATION_BYTES per token and layer) and the
    gradients' (4 N, after the activations are freed)."""
    state = 12 * w.params + (0 if t.algo == "ddp" else 8 * w.params)
    ffn = w.ffn_dim if w.ffn_dim is not None else 4 * w.dim
    per_token_layer = ACTIVATION_BYTES[0] * w.dim + ACTIVATION_BYTES[1] * ffn
    activations = per_token_layer * w.batch_size * w.seq_len * w.layers
    if compiled:
        activations *= COMPILED_ACTIVATIONS
    return int(state + max(2 * w.params + activations, 4 * w.params))


def sync_costs(w: Workload, t: Technique, n: int, link: LinkSpec | None) -> list[tuple[float, int]]:
    """(seconds, bytes each worker sends) of each synchronisation in one period of `t`: DDP's one
    all-reduce per step, DiLoCo's one per H steps, Streaming DiLoCo's one per fragment. The single
    source of these numbers for `predict` and the simulator (lowband.plan.simulate)."""
    if t.algo == "ddp":
        if n == 1:
            return [(0.0, 0)]
        if t.bits == 32:  # every bucket issued, then waited: they queue on the uplink
            traffic = [all_reduce_traffic(b, 4, 0, n) for b in w.ddp_buckets()]
            return [(sum(_t(link, x) for x in traffic), sum(x.sent for x in traffic))]
        return [quantized_reduce(w.params, n, t.bits, link)]
    if t.algo == "noloco":
        return [group_exchange(w.params, n, t, link)]
    p = t.fragments if t.algo == "streaming-diloco" else 1
    if t.compress:
        return [sparse_gather(numel, n, t.compress, link) for numel in w.fragment_numels(p)]
    return [quantized_reduce(numel, n, t.bits, link) for numel in w.fragment_numels(p)]


def predict(w: Workload, t: Technique, n: int, link: LinkSpec | None) -> Prediction:
    tc = w.compute_s
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
    step_s = tc + exposed
    steps = math.ceil(w.tokens / (n * w.step_tokens))
    return Prediction(
        technique=t,
        step_s=step_s,
        exposed_s=exposed,
        sync_s=sync_s,
        bytes_per_step=per_step,
        utilisation=tc / step_s if step_s > 0 else 1.0,
        memory_bytes=memory_bytes(w, t),
        time_to_budget_s=steps * step_s,
        steps=steps,
    )


def candidates(bits_choices=(32, 4), h_choices=(1, 30, 100, 500)) -> list[Technique]:
    """The techniques `lowband plan` ranks: DDP (fp32 and 8-bit), DiLoCo and Streaming DiLoCo at
    several H and bits, SparseLoCo at 1% / 2 bits, NoLoCo (groups of 2, bf16) and CO2 (4-bit)."""
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
    return out
