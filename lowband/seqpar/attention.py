"""Sequence-parallel attention: Ulysses, zigzag ring, TokenRing and the Ulysses x ring hybrid.

Every function takes this rank's shard of q, k, v (shaped B x H x L x D and B x K x L x D, L the
local length, laid out by `lowband.seqpar.layout.Layout`) and returns this rank's shard of the
output; autograd flows through (forward and backward are `torch.autograd.Function`s whose
backward talks to the same ranks again). `seq_len` is the true global length when the shards
are padded; `cu_seqlens` packs several sequences (global offsets, identical on every rank).

Ring (Liu et al. 2023; zigzag as in ring-flash-attention). Rank r keeps its queries; key/value
blocks travel r -> r+1. Step s: post the send of the block in hand and the receive of the next,
then attend to the block from rank r-s, merging into fp32 (out, lse). Backward: blocks travel
again, each with an fp32 dk/dv accumulator that every rank adds its share to and passes on; after
W steps one more hop brings each accumulator home. Every block's backward uses the GLOBAL merged
out and lse (ALGORITHMS.md): reusing a block's own partial LSE gives wrong gradients.

TokenRing (Wang et al. 2024). Rank r keeps its keys/values; queries travel r -> r+1 and the
partial (out, lse) computed for rank j's queries goes straight back to j, so both directions of
every link carry data. Backward: (q, dout, out, lse) travel the same way, dk/dv stay local and
partial dq goes back to the owner. The send of the next query block is posted before the
current block's compute; results are received one step late, so they also overlap.

Ulysses (Jacobs et al. 2023, DeepSpeed-Ulysses). An all-to-all turns sequence shards into head
shards (full sequence, H/W heads), attention runs locally, an all-to-all turns the output back.
Needs H % W == 0; kv heads: K % W == 0, or W % K == 0 in which case each kv head is repeated
W/K times before the all-to-all (its gradient sums back through the repeat); otherwise
ConfigError. Hybrid (USP, Fang & Zhao 2024): Ulysses inside groups of U ranks, ring across.

Before anything is sent, the ranks agree that their shards match (lowband.seqpar.agree: one
all-gather of a few int64): shards of different lengths, shapes, dtypes or masks raise the same
ConfigError on every rank instead of a Gloo abort on some. `check=False` skips it, for a caller
that makes the same call on every rank by construction (lowband's training loop checks its first).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd import Function

from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.seqpar.agree import agree, agree_2d, signature
from lowband.seqpar.blocks import acc_dtype, block_backward, block_forward, merge_, select_backend
from lowband.seqpar.layout import Call, Layout, Mask, Piece, concat_pieces, plan
from lowband.seqpar.p2p import Pending, all_to_all, exchange

# Tags keep the streams between one pair of ranks apart (Gloo matches on (peer, tag)).
_TAG_KV, _TAG_OUT, _TAG_LSE, _TAG_GRAD = 0, 1, 2, 3


def _forward_calls(calls, q, k, v, out, lse, scale, backend, written: list) -> None:
    """Run the calls, folding each into (out, lse). Rows no earlier call wrote (tracked on the
    host in `written`) are copied, not merged: most blocks of a zigzag ring need no merge."""
    for ql, qh, kl, kh, causal in calls:
        o, lse_o = block_forward(
            q[:, :, ql:qh], k[:, :, kl:kh], v[:, :, kl:kh], causal, scale, backend
        )
        if any(a < qh and ql < b for a, b in written):
            merge_(out[:, :, ql:qh], lse[:, :, ql:qh], o, lse_o.to(lse.dtype))
        else:
            out[:, :, ql:qh].copy_(o)
            lse[:, :, ql:qh].copy_(lse_o)
        written.append((ql, qh))


def _backward_calls(calls, dout, q, k, v, out, lse, dq, dk, dv, scale, backend) -> None:
    for ql, qh, kl, kh, causal in calls:
        a, b, c = block_backward(
            dout[:, :, ql:qh], q[:, :, ql:qh], k[:, :, kl:kh], v[:, :, kl:kh],
            out[:, :, ql:qh], lse[:, :, ql:qh], causal, scale, backend,
        )  # fmt: skip
        dq[:, :, ql:qh] += a
        dk[:, :, kl:kh] += b
        dv[:, :, kl:kh] += c


def _empty_acc(q: Tensor) -> tuple[Tensor, Tensor]:
    ct = acc_dtype(q.dtype)
    return q.new_zeros(q.shape, dtype=ct), q.new_full(q.shape[:3], -math.inf, dtype=ct)


class _Ring(Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, pieces, mask: Mask, scale, backend):
        W, r = comm.size, comm.rank
        nxt, prv = (r + 1) % W, (r - 1) % W
        out, lse = _empty_acc(q)
        kv = torch.stack([k, v]).contiguous()
        written: list[tuple[int, int]] = []
        for s in range(W):
            if s + 1 < W:
                kv_next = torch.empty_like(kv)
                pend = exchange(comm, [(kv, nxt, _TAG_KV)], [(kv_next, prv, _TAG_KV)])
            calls = plan(pieces[r], pieces[(r - s) % W], mask)
            _forward_calls(calls, q, kv[0], kv[1], out, lse, scale, backend, written)
            if s + 1 < W:
                pend.wait()
                kv = kv_next
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (comm, pieces, mask, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        comm, pieces, mask, scale, backend = ctx.args
        W, r = comm.size, comm.rank
        nxt, prv = (r + 1) % W, (r - 1) % W
        dout = dout.contiguous()
        ct = acc_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=ct)
        kv = torch.stack([k, v]).contiguous()
        pend_d: Pending | None = None
        d_recv = kv  # replaced by the first receive buffer before it is read
        for s in range(W):
            if s + 1 < W:
                kv_next = torch.empty_like(kv)
                pend_kv = exchange(comm, [(kv, nxt, _TAG_KV)], [(kv_next, prv, _TAG_KV)])
            dkv = torch.zeros_like(kv, dtype=ct)  # this rank's share for the block in hand
            calls = plan(pieces[r], pieces[(r - s) % W], mask)
            _backward_calls(
                calls, dout, q, kv[0], kv[1], out, lse, dq, dkv[0], dkv[1], scale, backend
            )
            if pend_d is not None:  # the shares of the ranks that held this block before
                pend_d.wait()
                dkv += d_recv
            if W > 1:  # pass the accumulator on; after step W-1 this brings our own one home
                d_recv = torch.empty_like(dkv)
                pend_d = exchange(comm, [(dkv, nxt, _TAG_GRAD)], [(d_recv, prv, _TAG_GRAD)])
            if s + 1 < W:
                pend_kv.wait()
                kv = kv_next
        if pend_d is not None:
            pend_d.wait()
            dkv = d_recv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), *([None] * 5)


class _TokenRing(Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Comm, pieces, mask: Mask, scale, backend):
        W, r = comm.size, comm.rank
        nxt, prv = (r + 1) % W, (r - 1) % W
        out, lse = _empty_acc(q)
        q_cur = q.contiguous()
        pending: list[tuple[Pending, Tensor, Tensor]] = []
        for s in range(W):
            if s + 1 < W:
                q_next = torch.empty_like(q_cur)
                pend_q = exchange(comm, [(q_cur, nxt, _TAG_KV)], [(q_next, prv, _TAG_KV)])
            j, src = (r - s) % W, (r + s) % W  # owner of the queries in hand; who has ours
            calls = plan(pieces[j], pieces[r], mask)
            if s == 0:
                _forward_calls(calls, q_cur, k, v, out, lse, scale, backend, [])
            else:
                o, lse_o = _empty_acc(q_cur)
                _forward_calls(calls, q_cur, k, v, o, lse_o, scale, backend, [])
                sends = [(o.to(_wire(q)), j, _TAG_OUT), (lse_o, j, _TAG_LSE)] if calls else []
                recvs = []
                if plan(pieces[r], pieces[src], mask):
                    ob, lb = torch.empty_like(o, dtype=_wire(q)), torch.empty_like(lse_o)
                    recvs = [(ob, src, _TAG_OUT), (lb, src, _TAG_LSE)]
                pend = exchange(comm, sends, recvs)
                _drain(pending, lambda ob, lb: merge_(out, lse, ob, lb))
                pending.append((pend, *(t for t, _, _ in recvs)) if recvs else (pend, None, None))
            if s + 1 < W:
                pend_q.wait()
                q_cur = q_next
        _drain(pending, lambda ob, lb: merge_(out, lse, ob, lb))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (comm, pieces, mask, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        comm, pieces, mask, scale, backend = ctx.args
        W, r = comm.size, comm.rank
        nxt, prv = (r + 1) % W, (r - 1) % W
        ct = acc_dtype(q.dtype)
        dq, dk, dv = (torch.zeros_like(t, dtype=ct) for t in (q, k, v))
        cur = torch.stack([q, dout, out]).contiguous()  # what a query block needs, in one message
        lse_cur = lse
        pending: list[tuple[Pending, Tensor | None, None]] = []
        for s in range(W):
            if s + 1 < W:
                nxt_pack, nxt_lse = torch.empty_like(cur), torch.empty_like(lse_cur)
                pend_q = exchange(
                    comm,
                    [(cur, nxt, _TAG_KV), (lse_cur, nxt, _TAG_LSE)],
                    [(nxt_pack, prv, _TAG_KV), (nxt_lse, prv, _TAG_LSE)],
                )
            j, src = (r - s) % W, (r + s) % W
            calls = plan(pieces[j], pieces[r], mask)
            qj, doj, oj = cur.unbind(0)
            if s == 0:
                _backward_calls(calls, doj, qj, k, v, oj, lse_cur, dq, dk, dv, scale, backend)
            else:
                dq_part = torch.zeros_like(qj, dtype=ct)
                _backward_calls(calls, doj, qj, k, v, oj, lse_cur, dq_part, dk, dv, scale, backend)
                buf = torch.empty_like(dq_part) if plan(pieces[r], pieces[src], mask) else None
                pend = exchange(
                    comm,
                    [(dq_part, j, _TAG_GRAD)] if calls else [],
                    [(buf, src, _TAG_GRAD)] if buf is not None else [],
                )
                _drain(pending, lambda g, _: dq.add_(g))
                pending.append((pend, buf, None))
            if s + 1 < W:
                pend_q.wait()
                cur, lse_cur = nxt_pack, nxt_lse
        _drain(pending, lambda g, _: dq.add_(g))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 5)


def _wire(q: Tensor) -> torch.dtype:
    """Partial outputs travel in q's dtype (fp32 for fp32/fp64 inputs); LSEs always in fp32+."""
    return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else acc_dtype(q.dtype)


def _drain(pending: list, use) -> None:
    """Wait for every posted result transfer and fold in what arrived."""
    for pend, a, b in pending:
        pend.wait()
        if a is not None:
            use(a, b)
    pending.clear()


# -- public API --------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ConfigError(
            f"expected q B x H x L x D and k, v B x K x L x D, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, L, D = q.shape
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != D or H % k.shape[1]:
        raise ConfigError(
            f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same B, L, D; H % K == 0)"
        )


def _mask(layout: Layout, local_len: int, causal: bool, seq_len, cu_seqlens) -> tuple[Mask, int]:
    padded = local_len * layout.world
    if padded % layout.multiple:
        raise ConfigError(
            f"{layout.kind} layout over {layout.world} ranks needs the padded global length to "
            f"be a multiple of {layout.multiple}; local length {local_len} gives {padded}"
        )
    if seq_len is None:
        seq_len = padded
    elif layout.padded(seq_len) != padded:
        raise ConfigError(
            f"seq_len {seq_len} pads to {layout.padded(seq_len)}, but the shards hold {padded}"
        )
    return Mask.make(causal, seq_len, cu_seqlens), padded


def _all_pieces(layout: Layout, padded: int) -> tuple[tuple[Piece, ...], ...]:
    return tuple(layout.pieces(i, padded) for i in range(layout.world))


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, comm: Comm, *, causal: bool = True, seq_len: int | None = None,
    cu_seqlens=None, scale: float | None = None, backend: str = "auto", layout: str = "zigzag",
    check: bool = True,
) -> Tensor:  # fmt: skip
    """Ring attention over `comm`: kv blocks travel, queries stay (zigzag layout by default)."""
    if check:
        sig = signature(q, k, v, causal=causal, seq_len=seq_len, cu_seqlens=cu_seqlens,
                        scale=scale, layout=layout)  # fmt: skip
        agree(comm, sig, "ring_attention")
    _check(q, k, v)
    lay = Layout(layout, comm.size)
    mask, padded = _mask(lay, q.shape[2], causal, seq_len, cu_seqlens)
    pieces = _all_pieces(lay, padded)
    return _Ring.apply(q, k, v, comm, pieces, mask, scale, select_backend(q, backend))


def token_ring_attention(
    q: Tensor, k: Tensor, v: Tensor, comm: Comm, *, causal: bool = True, seq_len: int | None = None,
    cu_seqlens=None, scale: float | None = None, backend: str = "auto", layout: str = "zigzag",
    check: bool = True,
) -> Tensor:  # fmt: skip
    """TokenRing over `comm`: queries travel one way, partial (out, lse) go back to their owner."""
    if check:
        sig = signature(q, k, v, causal=causal, seq_len=seq_len, cu_seqlens=cu_seqlens,
                        scale=scale, layout=layout)  # fmt: skip
        agree(comm, sig, "token_ring_attention")
    _check(q, k, v)
    lay = Layout(layout, comm.size)
    mask, padded = _mask(lay, q.shape[2], causal, seq_len, cu_seqlens)
    pieces = _all_pieces(lay, padded)
    return _TokenRing.apply(q, k, v, comm, pieces, mask, scale, select_backend(q, backend))


def _heads_for(q: Tensor, k: Tensor, v: Tensor, degree: int) -> tuple[Tensor, Tensor]:
    H, K = q.shape[1], k.shape[1]
    if H % degree:
        raise ConfigError(f"Ulysses needs query heads {H} divisible by its degree {degree}")
    if K % degree == 0:
        return k, v
    if degree % K == 0:  # replicate kv heads so each rank gets the one its query heads use
        return k.repeat_interleave(degree // K, dim=1), v.repeat_interleave(degree // K, dim=1)
    raise ConfigError(
        f"Ulysses needs kv heads {K} divisible by its degree {degree}, or the degree by them"
    )


def _ulysses_in(q, k, v, comm: Comm) -> tuple[Tensor, Tensor, Tensor]:
    k, v = _heads_for(q, k, v, comm.size)
    kv = all_to_all(torch.stack([k, v]), comm, scatter_dim=2, gather_dim=3)
    return all_to_all(q, comm, scatter_dim=1, gather_dim=2), kv[0], kv[1]


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, comm: Comm, *, causal: bool = True, seq_len: int | None = None,
    cu_seqlens=None, scale: float | None = None, backend: str = "auto", layout: str = "contiguous",
    check: bool = True,
) -> Tensor:  # fmt: skip
    """Ulysses over `comm`: all-to-all to head shards, local attention, all-to-all back."""
    if check:
        sig = signature(q, k, v, causal=causal, seq_len=seq_len, cu_seqlens=cu_seqlens,
                        scale=scale, layout=layout)  # fmt: skip
        agree(comm, sig, "ulysses_attention")
    _check(q, k, v)
    lay = Layout(layout, comm.size)
    mask, padded = _mask(lay, q.shape[2], causal, seq_len, cu_seqlens)
    whole = (concat_pieces(list(_all_pieces(lay, padded)), q.shape[2]),)
    qh, kh, vh = _ulysses_in(q, k, v, comm)
    out = _Ring.apply(qh, kh, vh, Comm(None), whole, mask, scale, select_backend(q, backend))
    return all_to_all(out, comm, scatter_dim=2, gather_dim=1)


def hybrid_attention(
    q: Tensor, k: Tensor, v: Tensor, ulysses_comm: Comm, ring_comm: Comm, *, causal: bool = True,
    seq_len: int | None = None, cu_seqlens=None, scale: float | None = None, backend: str = "auto",
    check: bool = True,
) -> Tensor:  # fmt: skip
    """Ulysses inside `ulysses_comm` (U ranks) x zigzag ring across `ring_comm` (R ranks).

    This rank's shard is `Layout("hybrid", R*U, U).shard(x, dim, ring_comm.rank * U +
    ulysses_comm.rank)`: the two groups form a 2-D arrangement, any rank numbering works.
    """
    if check:
        sig = signature(q, k, v, causal=causal, seq_len=seq_len, cu_seqlens=cu_seqlens,
                        scale=scale, layout="hybrid")  # fmt: skip
        agree_2d(ulysses_comm, ring_comm, sig, "hybrid_attention")
    _check(q, k, v)
    U, R = ulysses_comm.size, ring_comm.size
    lay = Layout("hybrid", R * U, U)
    mask, padded = _mask(lay, q.shape[2], causal, seq_len, cu_seqlens)
    L = q.shape[2]
    ring_pieces = tuple(
        concat_pieces([lay.pieces(i * U + u, padded) for u in range(U)], L) for i in range(R)
    )
    qh, kh, vh = _ulysses_in(q, k, v, ulysses_comm)
    out = _Ring.apply(qh, kh, vh, ring_comm, ring_pieces, mask, scale, select_backend(q, backend))
    return all_to_all(out, ulysses_comm, scatter_dim=2, gather_dim=1)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, seq_len: int | None = None,
    cu_seqlens=None, scale: float | None = None,
) -> Tensor:  # fmt: skip
    """Single-process textbook attention on the full sequence with an explicit dense mask (the
    test reference): fully masked rows (padding, tokens past cu_seqlens[-1]) give 0."""
    B, H, S, D = q.shape
    mask = Mask.make(causal, S if seq_len is None else seq_len, cu_seqlens)
    seg = torch.full((S,), -1, dtype=torch.long)
    for i, (a, b) in enumerate(zip(mask.cu_seqlens, mask.cu_seqlens[1:])):
        seg[a : min(b, mask.seq_len)] = i
    allowed = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
    if causal:
        allowed &= torch.ones(S, S, dtype=torch.bool).tril()
    allowed = allowed.to(q.device)
    rows = allowed.any(-1, keepdim=True)
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = (q @ kk.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(D))
    s = s.masked_fill(~allowed, -math.inf).masked_fill(~rows, 0.0)
    return (torch.softmax(s, dim=-1) * rows) @ vv


__all__ = [
    "Call",
    "hybrid_attention",
    "reference_attention",
    "ring_attention",
    "token_ring_attention",
    "ulysses_attention",
]
