"""Sequence parallelism in `lowband plan`: per scheme and degree d, the bytes each worker sends
per training step, the communication time and how much of it is exposed, and the peak memory
per device, for one sequence sharded over d GPUs of a site (`lowband train --seq-parallel SCHEME
--cp d --algo ddp`).

Bytes are counted with the functions `lowband.comm` charges in a real run (accounting's
p2p_traffic, all_to_all_traffic, all_reduce_traffic, all_gather_traffic) on the tensors
lowband.seqpar.attention sends, so they are exact (tests/test_plan.py compares them with a run);
seconds are LinkSpec.ideal_time of the intra-site link. Notation, per cp rank and per layer:
B the batch (full sequences), S the sequence length, L = S/d the local length, H query heads,
K kv heads, D the head size, e the bytes of an activation (2: bf16 on a GPU; 4 on CPU), c = 4
(fp32 accumulators, LSEs and gradients: lowband.seqpar.blocks.acc_dtype), t(bytes) =
ideal_time(bytes, 1) for messages posted together (they queue on the uplink, one latency).

  ulysses    forward: three all-to-alls (q: B H L D; k,v: 2 B K' L D; out: B H L D values),
             backward: their inverses, the same sizes. K' = K if d | K, else d (kv heads repeated
             up to d). Each all-to-all sends (d-1)/d of its input at e bytes, and blocks:
             exposed = sum of t(all-to-all), all of it.
  ring       forward: d-1 hops of the k/v block (2 B K L D at e). Backward: d-1 k/v hops and d
             hops of the fp32 dk/dv accumulator (2 B K L D at c). Step s posts its transfers
             before its block's attention and waits after it: exposed per step = max(0,
             t(bytes in flight) - one block's attention time); the accumulator's last hop home
             is posted after the last block and waited at once: exposed whole.
  tokenring  forward: d-1 hops of q (B H L D at e), d-1 partial results back to their owners
             (out B H L D at e, lse B H L at c); backward: d-1 hops of (q, dout, out) (3 B H L
             D at e) and lse (B H L at c), d-1 partial dq back (B H L D at c). Results are
             received one step late (in flight during the next block); the last is exposed.
  hybrid     Ulysses inside groups of U = 2 (`--cp-ulysses`' default) over (H, K, L), then the
             ring over R = d/U with kv heads K'/U and length U L, then the output all-to-all.
  every scheme, per step: the loss mean (one fp32 all-reduce over the cp group, blocking: 2(d-1)
             latencies; 8 or 4 bytes by rank, the mean is taken); per run: one all-gather of the
             26-int64 shard signature (lowband.seqpar.agree).

One block's attention time: the step's compute t_c = B S / (tokens/s) is shared evenly by the d
ranks (zigzag balances causal work; Ulysses splits heads), and within a layer attention takes the
FLOP share A / (3.5 A + 3 P) of it, forward A = 2 S H D per token (causal), backward 2.5x,
linear layers P = 2 dim (2 H D + 2 K D + 3 ffn) per token forward, backward 2x. The ring's step
gets 1/d of a layer's attention. Data parallelism (DDP's gradient all-reduce over all workers) is
the main table's DDP row and comes on top.

Memory: lowband.plan.cost.memory_bytes of the DDP step with the sequence shortened to S/d (the
activations are per token, so they shrink by d; the fused attention keeps no S^2 term), eager
(`lowband train` does not compile blocks when sequence parallelism is on); parameters, gradients
and AdamW state are replicated (DDP). One layer's transient buffers (k/v blocks in flight, fp32
accumulators) are left out.

On CUDA the ring's and TokenRing's transfers go out through NCCL's batch_isend_irecv: their bytes
are counted but `lowband train`'s link emulation does not delay them (docs/seqpar.md, Limits), so
these seconds are a prediction for a real link, not for the emulation.
"""

from __future__ import annotations

import dataclasses

from lowband.comm import LinkSpec
from lowband.comm.accounting import (
    all_gather_traffic,
    all_reduce_traffic,
    all_to_all_traffic,
    p2p_traffic,
)
from lowband.plan.cost import Technique, Workload, memory_bytes

SCHEMES = ("ulysses", "ring", "tokenring", "hybrid")
"""What `lowband train --seq-parallel` accepts (lowband.seqpar.train.VARIANTS)."""
HYBRID_ULYSSES = 2
"""The hybrid's Ulysses degree, `--cp-ulysses`' default."""
SIGNATURE_INT64 = 26
"""lowband.seqpar.agree's signature: int64 values per rank, all-gathered once per run."""


@dataclasses.dataclass(frozen=True)
class Heads:
    """Attention shape: query heads H, kv heads K, head size D."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclasses.dataclass
class SeqParPrediction:
    scheme: str
    degree: int
    refusal: str | None
    """Why `lowband train` refuses this scheme at this degree (None: it runs)."""
    bytes_per_step: float = 0
    """Bytes each worker sends per training step for attention and the loss mean (the mean
    over the cp group's ranks, as a run's summary reports)."""
    forward_bytes: float = 0
    """Of which the forward pass (what one evaluation batch sends, loss mean included)."""
    comm_s: float = 0.0
    """The step's sequence-parallel transfers back to back on the link."""
    exposed_s: float = 0.0
    """Of which not hidden behind attention compute."""
    step_s: float = 0.0
    """Compute t_c / d plus exposed communication (DDP's gradient all-reduce not included)."""
    memory_bytes: int = 0
    fits: bool | None = None

    def row(self) -> dict:
        return dataclasses.asdict(self)


def refusal(scheme: str, d: int, seq_len: int, heads: Heads, workers: int) -> str | None:
    """lowband.seqpar.train.check_options' refusals, in its words (None: accepted)."""
    if scheme not in SCHEMES:
        return f"unknown --seq-parallel {scheme!r}; choose one of: {', '.join(SCHEMES)}"
    if d < 1 or workers % d:
        return f"--cp {d} must be at least 1 and divide --workers {workers}"
    u = {"ulysses": d, "hybrid": HYBRID_ULYSSES}.get(scheme, 1)
    if scheme == "hybrid" and d % u:
        return f"--cp-ulysses {u} must divide --cp {d}"
    multiple = d if scheme == "ulysses" else 2 * d
    if seq_len % multiple:
        return (
            f"--seq-len {seq_len} must be a multiple of {multiple} for --seq-parallel {scheme} "
            f"--cp {d}"
        )
    h, k = heads.heads, heads.kv_heads
    if u > 1 and (h % u or (k % u and u % k)):
        return (
            f"Ulysses degree {u} must divide the heads ({h} query, {k} kv; or be a multiple of "
            "the kv heads)"
        )
    return None


@dataclasses.dataclass
class _Layer:
    """One layer's sequence-parallel traffic, forward and backward: bytes sent, wire seconds,
    exposed seconds."""

    fwd_sent: int = 0
    bwd_sent: int = 0
    comm_s: float = 0.0
    exposed_s: float = 0.0

    def __add__(self, o: _Layer) -> _Layer:
        return _Layer(
            self.fwd_sent + o.fwd_sent,
            self.bwd_sent + o.bwd_sent,
            self.comm_s + o.comm_s,
            self.exposed_s + o.exposed_s,
        )


def _t(link: LinkSpec | None, nbytes: int, rounds: int = 1) -> float:
    return 0.0 if link is None or (nbytes == 0 and rounds == 0) else link.ideal_time(nbytes, rounds)


def _schedule(
    link: LinkSpec | None, first: int, second: int, w: int, hide: float, second_from: int
) -> tuple[float, float]:
    """(wire seconds, exposed seconds) of one ring pass of w steps (lowband.seqpar.attention):
    `first` bytes are posted before step s's compute and waited after it (s = 0..w-2); `second`
    bytes are produced by steps second_from..w-1, posted after the step's compute and waited
    after the next step's (so in flight during it); the last one is waited at once. `hide`: one
    step's compute."""
    wire = exposed = 0.0
    for s in range(w):
        nbytes = (first if s <= w - 2 else 0) + (second if s - 1 >= second_from else 0)
        if nbytes:
            t = _t(link, nbytes)
            wire, exposed = wire + t, exposed + max(0.0, t - hide)
    if second and w - 1 >= second_from:
        t = _t(link, second)
        wire, exposed = wire + t, exposed + t
    return wire, exposed


def _ring(link, w, b, kv_heads, length, d_head, e, hide_f, hide_b) -> _Layer:
    if w == 1:
        return _Layer()
    kv = p2p_traffic(2 * b * kv_heads * length * d_head, e, sending=True)
    dkv = p2p_traffic(2 * b * kv_heads * length * d_head, 4, sending=True)
    fw, fx = _schedule(link, kv.critical_bytes, 0, w, hide_f / w, 0)
    bw, bx = _schedule(link, kv.critical_bytes, dkv.critical_bytes, w, hide_b / w, 0)
    return _Layer((w - 1) * kv.sent, (w - 1) * kv.sent + w * dkv.sent, fw + bw, fx + bx)


def _token_ring(link, w, b, heads, length, d_head, e, hide_f, hide_b) -> _Layer:
    if w == 1:
        return _Layer()
    n = b * heads * length * d_head
    q = p2p_traffic(n, e, sending=True)
    res = [p2p_traffic(n, e, sending=True), p2p_traffic(b * heads * length, 4, sending=True)]
    pack = [p2p_traffic(3 * n, e, sending=True), p2p_traffic(b * heads * length, 4, sending=True)]
    dq = p2p_traffic(n, 4, sending=True)
    res_b, pack_b = (sum(x.critical_bytes for x in m) for m in (res, pack))
    fw, fx = _schedule(link, q.critical_bytes, res_b, w, hide_f / w, 1)
    bw, bx = _schedule(link, pack_b, dq.critical_bytes, w, hide_b / w, 1)
    fwd = (w - 1) * (q.sent + sum(x.sent for x in res))
    bwd = (w - 1) * (sum(x.sent for x in pack) + dq.sent)
    return _Layer(fwd, bwd, fw + bw, fx + bx)


def _ulysses(link, u, b, h: Heads, length, e) -> tuple[_Layer, int]:
    """Ulysses' all-to-alls over u ranks (all blocking); also the kv heads each rank then holds
    (K' / u: the kv heads repeated up to u where u does not divide them)."""
    if u == 1:
        return _Layer(), h.kv_heads
    kv_heads = h.kv_heads if h.kv_heads % u == 0 else u
    q = all_to_all_traffic(b * h.heads * length * h.head_dim, e, 0, u)
    kv = all_to_all_traffic(2 * b * kv_heads * length * h.head_dim, e, 0, u)
    one_way = [q, kv, q]  # q and k/v in, the output back; backward: the inverses, same sizes
    sent = sum(x.sent for x in one_way)
    seconds = 2 * sum(_t(link, x.critical_bytes, x.rounds) for x in one_way)
    return _Layer(sent, sent, seconds, seconds), kv_heads // u


def attention_share(w: Workload, h: Heads) -> float:
    """Attention's share of one layer's forward + backward FLOPs at sequence length S (module
    docstring): A / (3.5 A + 3 P) is the forward's share; returned is that forward share."""
    ffn = w.ffn_dim if w.ffn_dim is not None else 4 * w.dim
    a = 2 * w.seq_len * h.heads * h.head_dim
    p = 2 * w.dim * (2 * h.heads * h.head_dim + 2 * h.kv_heads * h.head_dim + 3 * ffn)
    return a / (3.5 * a + 3 * p)


def predict_seqpar(
    w: Workload,
    h: Heads,
    scheme: str,
    d: int,
    link: LinkSpec | None,
    *,
    workers: int,
    device_memory: float | None = None,
    itemsize: int = 2,
) -> SeqParPrediction:
    """One scheme at degree d (module docstring). `itemsize`: the activations' bytes (2: bf16
    autocast on a GPU, what the plan assumes; 4: fp32, `lowband train` on CPU)."""
    why = refusal(scheme, d, w.seq_len, h, workers)
    if why is not None:
        return SeqParPrediction(scheme, d, why)
    b, length = w.batch_size, w.seq_len // d
    tc = w.compute_s / d
    hide_f = tc / w.layers * attention_share(w, h)  # one layer's forward attention on this rank
    hide_b = 2.5 * hide_f
    if scheme == "ring":
        layer = _ring(link, d, b, h.kv_heads, length, h.head_dim, itemsize, hide_f, hide_b)
    elif scheme == "tokenring":
        layer = _token_ring(link, d, b, h.heads, length, h.head_dim, itemsize, hide_f, hide_b)
    else:
        u = d if scheme == "ulysses" else HYBRID_ULYSSES
        layer, kv_heads = _ulysses(link, u, b, h, length, itemsize)
        layer = layer + _ring(
            link, d // u, b, kv_heads, u * length, h.head_dim, itemsize, hide_f, hide_b
        )
    loss = all_reduce_traffic(1, 4, 0, d)  # the group's mean loss, blocking
    t_loss = _t(link, loss.critical_bytes, loss.rounds)
    # a 1-element ring all-reduce sends 8 or 4 bytes by rank: the mean, as a run's summary has it
    loss_sent = sum(all_reduce_traffic(1, 4, r, d).sent for r in range(d)) / d
    fwd = w.layers * layer.fwd_sent + loss_sent
    exposed = w.layers * layer.exposed_s + t_loss
    mem = memory_bytes(dataclasses.replace(w, seq_len=length), Technique("ddp"), compiled=False)
    return SeqParPrediction(
        scheme=scheme,
        degree=d,
        refusal=None,
        bytes_per_step=fwd + w.layers * layer.bwd_sent,
        forward_bytes=fwd,
        comm_s=w.layers * layer.comm_s + t_loss,
        exposed_s=exposed,
        step_s=tc + exposed,
        memory_bytes=mem,
        fits=None if device_memory is None else mem <= device_memory,
    )


def signature_bytes(scheme: str, d: int) -> int:
    """Bytes each rank sends once per run (the first attention call): the all-gather of the
    shards' signature (lowband.seqpar.agree; the hybrid's inside its Ulysses group, then the
    group's table across the ring)."""
    if scheme != "hybrid":
        return all_gather_traffic(SIGNATURE_INT64, 8, 0, d).sent
    u = HYBRID_ULYSSES
    inner = all_gather_traffic(SIGNATURE_INT64, 8, 0, u).sent
    return inner + all_gather_traffic(u * SIGNATURE_INT64, 8, 0, d // u).sent


def advice(preds: list[SeqParPrediction]) -> SeqParPrediction | None:
    """The smallest degree at which some scheme fits, and there the fastest step."""
    ok = [p for p in preds if p.refusal is None and p.fits]
    if not ok:
        return None
    d = min(p.degree for p in ok)
    return min((p for p in ok if p.degree == d), key=lambda p: (p.step_s, p.bytes_per_step))


# -- `lowband plan`'s sequence-parallel table ---------------------------------------------------

DEGREES = (2, 4, 8)
"""The degrees the table tries, up to the GPUs of a site."""


def parse_degree(spec: str) -> tuple[str | None, int]:
    """`--seq-parallel D` or `SCHEME:D` (ConfigError otherwise)."""
    from lowband.errors import ConfigError

    scheme, _, d = spec.rpartition(":")
    try:
        degree = int(d)
    except ValueError:
        degree = 0
    if degree < 1 or (scheme and scheme not in SCHEMES):
        raise ConfigError(
            f"--seq-parallel must be D or SCHEME:D with D >= 1 and SCHEME one of "
            f"{', '.join(SCHEMES)}, got {spec!r}"
        )
    return scheme or None, degree


def section(
    w: Workload,
    h: Heads,
    link: LinkSpec | None,
    *,
    workers: int,
    site_gpus: int,
    device_memory: float,
    forced: tuple[str | None, int] | None,
) -> list[SeqParPrediction]:
    """The table's rows: every scheme at `forced`'s degree (and only its scheme, if named), or at
    DEGREES up to `site_gpus`. A degree that `lowband train` (or the site) refuses for every
    scheme, or a named scheme's refusal, raises ConfigError (one line)."""
    from lowband.errors import ConfigError

    schemes = SCHEMES if forced is None or forced[0] is None else (forced[0],)
    degrees = [d for d in DEGREES if d <= site_gpus] if forced is None else [forced[1]]
    rows = []
    for d in degrees:
        for s in schemes:
            p = predict_seqpar(w, h, s, d, link, workers=workers, device_memory=device_memory)
            if p.refusal is None and site_gpus % d:
                p = SeqParPrediction(
                    s, d, f"--cp {d} must divide the {site_gpus} GPUs of a site (one cp group "
                    "per site: its transfers stay on the intra-site link)",
                )  # fmt: skip
            rows.append(p)
    if forced is not None and all(p.refusal for p in rows):
        reasons = list(dict.fromkeys(p.refusal for p in rows))
        if len(reasons) > 1:
            reasons = [f"{p.scheme}: {p.refusal}" for p in rows]
        raise ConfigError(f"--seq-parallel {forced[1]}: {'; '.join(reasons)}")
    return rows


def table(rows: list[SeqParPrediction]) -> list[str]:
    head = (
        f"{'scheme':<10} {'d':>2} {'memory':>8} {'fits':>4} {'MB/step':>9} {'comm':>9} "
        f"{'exposed':>9} {'step':>9}"
    )
    out = [head, "-" * len(head)]
    for p in rows:
        if p.refusal:
            out.append(f"{p.scheme:<10} {p.degree:>2} refused: {p.refusal}")
            continue
        out.append(
            f"{p.scheme:<10} {p.degree:>2} {p.memory_bytes / 2**30:>6.1f}GB "
            f"{'yes' if p.fits else 'no':>4} {p.bytes_per_step / 1e6:>9.1f} "
            f"{1e3 * p.comm_s:>7.1f}ms {1e3 * p.exposed_s:>7.1f}ms {1e3 * p.step_s:>7.0f}ms"
        )
    return out
