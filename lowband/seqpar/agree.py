"""Before any transfer: do the ranks of a group hand attention matching shards?

Ring, TokenRing, Ulysses and the hybrid exchange blocks whose sizes each rank computes from its
own shard. Ranks that disagree (another local length, batch, head count, head size, dtype, mask
or layout) post transfers of different sizes, and Gloo then aborts the process
(`op.preamble.length <= op.nbytes`) on the ranks that did nothing wrong as well; a rank whose own
argument checks fail raises alone while its peers wait for it. So every public attention
function first agrees on a signature of its arguments:

  1. Each rank encodes its arguments as a few int64 (`signature`).
  2. One all-gather over the group (a few dozen bytes per rank, counted like every transfer).
  3. Every rank holds the same table, so every rank raises the same ConfigError, naming what
     differs and on which ranks, before anything else is sent; or none does.

The hybrid arrangement has two groups per rank: step 2 runs inside the Ulysses group, then the
ring group gathers each member's whole Ulysses table, so every rank sees all R x U signatures
(every ring group holds one member of every Ulysses group) and the verdict is the same on all.
"""

from __future__ import annotations

import struct
import zlib

import torch
from torch import Tensor

from lowband.comm import Comm
from lowband.errors import ConfigError

_DTYPES = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=lambda d: str(d)
)
_FIELDS = (  # (name, int64 it takes); q is B x H x L x D, k and v B x K x L x D
    ("batch", 1), ("query heads", 1), ("local length", 1), ("head size", 1), ("kv heads", 1),
    ("q shape", 5), ("k shape", 5), ("v shape", 5), ("dtype", 1), ("causal", 1),
    ("seq_len", 1), ("cu_seqlens", 1), ("scale", 1), ("layout", 1),
)  # fmt: skip
_SHAPES = {"q shape", "k shape", "v shape"}  # named only when none of the named sizes differs


def _shape(t: Tensor) -> list[int]:
    dims = list(t.shape)
    return [len(dims), *(dims + [-1] * 4)[:4]]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def signature(
    q: Tensor, k: Tensor, v: Tensor, *, causal, seq_len, cu_seqlens, scale, layout: str
) -> list[int]:
    """Step 1: this rank's arguments as int64, field by field (_FIELDS)."""
    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens]
    scale_bits = -1 if scale is None else struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    qs, ks = _shape(q), _shape(k)
    return [
        *qs[1:],  # batch, query heads, local length, head size (-1 where q has fewer dims)
        ks[2],  # kv heads
        *qs,
        *ks,
        *_shape(v),
        _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
        int(bool(causal)),
        -1 if seq_len is None else int(seq_len),
        -1 if cu is None else _crc(repr(cu)),
        scale_bits,
        _crc(layout),
    ]


def _show(field: str, values: list[int]) -> str:
    if field in _SHAPES:
        ndim, *dims = values
        shown = dims[: min(ndim, 4)] + (["..."] if ndim > 4 else [])
        return "x".join(str(d) for d in shown) if ndim else "a scalar"
    (x,) = values
    if field == "dtype":
        return str(_DTYPES[x]).removeprefix("torch.") if 0 <= x < len(_DTYPES) else "other"
    if field == "causal":
        return str(bool(x))
    if field == "scale":
        return "None" if x == -1 else f"{struct.unpack('<d', struct.pack('<q', x))[0]:g}"
    if field in ("cu_seqlens", "layout") and x != -1:
        return "a value"
    return "None" if x == -1 else str(x)


def _verdict(table: list[list[int]], what: str) -> None:
    """Step 3: ConfigError naming the fields that differ across the rows of `table`."""
    if all(row == table[0] for row in table):
        return
    differ, start = {}, 0
    for field, width in _FIELDS:
        values = [tuple(row[start : start + width]) for row in table]
        start += width
        if len(set(values)) > 1:
            differ[field] = values
    if set(differ) - _SHAPES:
        differ = {k: v for k, v in differ.items() if k not in _SHAPES}
    parts = []
    for field, values in list(differ.items())[:3]:
        ranks: dict[tuple, list[int]] = {}
        for r, val in enumerate(values):
            ranks.setdefault(val, []).append(r)
        shown = [
            f"{_show(field, list(val))} on rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}"
            for val, rs in ranks.items()
        ]
        parts.append(f"{field} {' vs '.join(shown)}")
    raise ConfigError(
        f"{what}: the ranks hand it different shards ({'; '.join(parts)}); every rank must "
        "pass its equal part of the same (padded) sequences, with the same mask and options"
    )


def _gather(comm: Comm, row: Tensor) -> Tensor:
    out = [torch.empty_like(row) for _ in range(comm.size)]
    comm.all_gather(out, row)
    return torch.stack(out).cpu()


def agree(comm: Comm, sig: list[int], what: str) -> None:
    """Steps 2-3 over one group: every rank returns, or every rank raises the same ConfigError."""
    if comm.size == 1:
        return
    table = _gather(comm, torch.tensor(sig, dtype=torch.int64, device=comm.device))
    _verdict(table.tolist(), what)


def agree_2d(ulysses: Comm, ring: Comm, sig: list[int], what: str) -> None:
    """The hybrid's check (module docstring): rows of the verdict's table are ordered by
    ring rank x U + Ulysses rank, the layout's numbering."""
    row = torch.tensor(sig, dtype=torch.int64, device=ulysses.device)
    inner = _gather(ulysses, row) if ulysses.size > 1 else row.cpu().unsqueeze(0)
    grid = _gather(ring, inner.to(ring.device)) if ring.size > 1 else inner.unsqueeze(0)
    _verdict(grid.reshape(-1, len(sig)).tolist(), what)
