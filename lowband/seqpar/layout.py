"""Which tokens of a sequence each rank holds, and which block kernels a pair of shards needs.

A rank's shard is a list of *pieces*: runs of consecutive global positions stored one after
another in its local tensor. A piece is (local offset, global start, global end).

    contiguous  rank r holds [r*n, (r+1)*n)                                   (Ulysses)
    zigzag      rank r holds chunks r and 2W-1-r of 2W equal chunks           (ring, TokenRing)
                so every rank does the same causal work (ALGORITHMS.md: zigzag)
    hybrid      W = R*U ranks, rank g = ring_rank*U + u: the zigzag shard of ring rank
                ring_rank over R, cut contiguously into U parts, part u on rank g (Ulysses inside
                a group of U consecutive ranks, ring across the R groups)

Lengths. A sequence of S tokens is padded at its end to a multiple of `Layout.multiple` (W, 2W,
2RU); padded tokens belong to no segment, so they attend to nothing and nothing attends to them
(their outputs are 0, their gradients 0). `cu_seqlens` packs several sequences: segment i is
[cu[i], cu[i+1]); tokens past cu[-1] are padding too (fully masked rows).

`plan` turns (query pieces, key pieces, mask) into kernel calls (q_lo, q_hi, k_lo, k_hi, causal)
over local indices, each either full attention or square top-left causal attention, so every call
maps onto a fused SDPA kernel; rows no call touches see nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from lowband.errors import ConfigError

Piece = tuple[int, int, int]  # (local offset, global start, global end)
Call = tuple[int, int, int, int, bool]  # (q_lo, q_hi, k_lo, k_hi, causal), local indices

LAYOUTS = ("contiguous", "zigzag", "hybrid")


@dataclass(frozen=True)
class Layout:
    """How a sequence is cut over `world` ranks; `inner` is the Ulysses degree of "hybrid"."""

    kind: str
    world: int
    inner: int = 1

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.kind!r}; choose one of: {', '.join(LAYOUTS)}")
        if self.world < 1 or self.inner < 1 or self.world % self.inner:
            raise ConfigError(
                f"layout {self.kind}: world {self.world} must be a multiple of inner {self.inner}"
            )

    @property
    def multiple(self) -> int:
        """Padded lengths are multiples of this."""
        return {"contiguous": self.world, "zigzag": 2 * self.world, "hybrid": 2 * self.world}[
            self.kind
        ]

    def padded(self, seq_len: int) -> int:
        return -(-seq_len // self.multiple) * self.multiple

    def pieces(self, rank: int, padded_len: int) -> tuple[Piece, ...]:
        return _pieces(self, rank, padded_len)

    def positions(self, rank: int, padded_len: int, device=None) -> Tensor:
        """Global positions of rank's local tokens (int64, length padded_len // world)."""
        return torch.cat(
            [torch.arange(s, e, device=device) for _, s, e in self.pieces(rank, padded_len)]
        )

    def shard(self, x: Tensor, dim: int, rank: int) -> Tensor:
        """Rank's part of a full tensor whose `dim` is the sequence (zero-padded to `padded`)."""
        S = x.shape[dim]
        pad = self.padded(S) - S
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return torch.cat(
            [x.narrow(dim, s, e - s) for _, s, e in self.pieces(rank, self.padded(S))], dim=dim
        )


@functools.lru_cache(maxsize=4096)
def _pieces(layout: Layout, rank: int, padded_len: int) -> tuple[Piece, ...]:
    W = layout.world
    if padded_len % layout.multiple:
        raise ConfigError(f"padded length {padded_len} is not a multiple of {layout.multiple}")
    if layout.kind == "contiguous":
        n = padded_len // W
        return ((0, rank * n, (rank + 1) * n),)
    if layout.kind == "zigzag":
        return _zigzag(rank, W, padded_len)
    R, U = W // layout.inner, layout.inner
    ring_rank, u = divmod(rank, U)
    n = padded_len // W
    return _slice_pieces(_zigzag(ring_rank, R, padded_len), u * n, (u + 1) * n)


def _zigzag(rank: int, world: int, padded_len: int) -> tuple[Piece, ...]:
    c = padded_len // (2 * world)
    a, b = rank, 2 * world - 1 - rank
    return ((0, a * c, (a + 1) * c), (c, b * c, (b + 1) * c))


def _slice_pieces(pieces: tuple[Piece, ...], lo: int, hi: int) -> tuple[Piece, ...]:
    """The local range [lo, hi) of a shard, as pieces with offsets relative to lo."""
    out = []
    for off, s, e in pieces:
        a, b = max(lo, off), min(hi, off + e - s)
        if a < b:
            out.append((a - lo, s + a - off, s + b - off))
    return tuple(out)


def concat_pieces(shards: list[tuple[Piece, ...]], length: int) -> tuple[Piece, ...]:
    """Pieces of shards of `length` tokens each laid one after another (an all-to-all's output)."""
    return tuple((i * length + o, s, e) for i, p in enumerate(shards) for o, s, e in p)


@dataclass(frozen=True)
class Mask:
    """The attention mask of one (packed) sequence: causal or not, segments, valid length."""

    causal: bool
    seq_len: int
    cu_seqlens: tuple[int, ...]

    @staticmethod
    def make(causal: bool, seq_len: int, cu_seqlens=None) -> Mask:
        if cu_seqlens is None:
            cu = (0, seq_len)
        else:
            cu = tuple(
                int(c) for c in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)
            )
            if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > seq_len:
                raise ConfigError(
                    f"cu_seqlens must start at 0, not decrease and end at most at seq_len "
                    f"{seq_len}, got {list(cu)}"
                )
        return Mask(bool(causal), int(seq_len), cu)


@functools.lru_cache(maxsize=4096)
def plan(q_pieces: tuple[Piece, ...], k_pieces: tuple[Piece, ...], mask: Mask) -> tuple[Call, ...]:
    """Kernel calls that together compute attention of the q shard over the k shard under mask.

    Per segment, a query run [q0, q1) and a key run [k0, k1) (global positions) need, causally:
    the keys before q0 in full; the overlap [d0, d1) as a square causal block; and the query rows
    after d1 over that overlap in full. Calls are then merged where they tile a larger rectangle.
    """
    segs = [(a, min(b, mask.seq_len)) for a, b in zip(mask.cu_seqlens, mask.cu_seqlens[1:])]
    segs = [(a, b) for a, b in segs if a < b]
    if mask.causal and q_pieces == k_pieces and len(segs) == 1 and segs[0][0] == 0:
        n = _valid_prefix(q_pieces, segs[0][1])  # tokens past the one sequence are padding
        if n is not None:  # one ascending run of valid tokens: a single causal call covers it
            return ((0, n, 0, n, True),) if n else ()
    calls: list[Call] = []
    for qo, qs, qe in q_pieces:
        for ko, ks, ke in k_pieces:
            for a, b in segs:
                q0, q1 = max(qs, a), min(qe, b)
                k0, k1 = max(ks, a), min(ke, b)
                if q0 >= q1 or k0 >= k1:
                    continue
                ql, kl = qo - qs, ko - ks  # global -> local shift
                if not mask.causal:
                    calls.append((q0 + ql, q1 + ql, k0 + kl, k1 + kl, False))
                    continue
                if k0 < min(k1, q0):
                    calls.append((q0 + ql, q1 + ql, k0 + kl, min(k1, q0) + kl, False))
                d0, d1 = max(k0, q0), min(k1, q1)
                if d0 < d1:
                    calls.append((d0 + ql, d1 + ql, d0 + kl, d1 + kl, True))
                    if d1 < q1:
                        calls.append((d1 + ql, q1 + ql, d0 + kl, d1 + kl, False))
    return tuple(_merge(calls))


def _valid_prefix(pieces: tuple[Piece, ...], seq_len: int) -> int | None:
    """Number of valid local tokens if they form an ascending local prefix, else None."""
    n, last, ended = 0, -1, False
    for off, s, e in pieces:
        v = max(0, min(e, seq_len) - s)
        if v and (ended or off != n or s < last):
            return None
        if v < e - s:
            ended = True
        n += v
        last = e
    return n


def _merge(calls: list[Call]) -> list[Call]:
    """Join full calls sharing a q range with adjacent k ranges, then k ranges with adjacent q."""
    full = sorted(c for c in calls if not c[4])
    causal = [c for c in calls if c[4]]
    for key, lo, hi in ((lambda c: (c[0], c[1]), 2, 3), (lambda c: (c[2], c[3]), 0, 1)):
        full.sort(key=lambda c: (key(c), c[lo]))
        out: list[Call] = []
        for c in full:
            if out and key(out[-1]) == key(c) and out[-1][hi] == c[lo]:
                m = list(out[-1])
                m[hi] = c[hi]
                out[-1] = tuple(m)  # type: ignore[assignment]
            else:
                out.append(c)
        full = out
    return causal + full
