"""Chunked top-k with low-bit values and error feedback: SparseLoCo's outer-gradient compressor.

SparseLoCo (Sarfi, Therien, Lidin, Belilovsky 2025), per worker r and outer round t, with Delta_r
the pseudo-gradient (theta_g - theta_r) and e_r the worker's error-feedback buffer:

    e_r     <- beta * e_r + Delta_r
    D_r      = Q(TopK(e_r))            per chunk of `chunk` consecutive values: the k largest in
                                        magnitude, their values quantised to `bits`
    e_r     <- e_r - D_r               what was not sent (or was rounded off) is sent later
    Delta    = (1/R) sum_r D_r         identical on every worker (decoded in rank order)
    theta_g <- theta_g - alpha * Delta (no outer momentum: the decayed buffer stands in for it)

Chunk layout (`layout`, the spec's 4th field): "flat" (the default) cuts the fragment's flat vector
into runs of `chunk` consecutive values, across tensor boundaries. "tiles" is the reference
code's rule (module TiledTopK, docs/diloco.md): chunks never cross a tensor; a matrix (a tensor
of 2 or more dimensions, seen as [shape[0], rest]) is cut into h x w tiles, h and w the largest
divisors of its two sides no larger than sqrt(chunk) (64 x 64 for chunk 4096); any other tensor,
or a matrix whose tiles would be under chunk/4 values, into runs of `chunk` values of its own.
As in that code, k is a count per chunk, round(fraction x chunk), the same for every chunk
(at most the chunk's size: a norm weight of 128 values keeps 41 of them at 1%, a 64 x 64 tile 41
of 4096); each tensor has its own index width. "tiles" needs the tensors' shapes: `bind(shapes)`
returns the compressor for one fragment.

The quantiser (`bits` b < 32): per chunk, s = max |v| over its k kept values; a value v is sent
as the nearest of 2^b levels spread evenly over [-s, s] (b = 2: -s, -s/3, s/3, s), so the
largest value of each chunk is exact and the rounding error goes back into e_r. b = 32 sends the
values as fp32 and no scale.

Wire format of one worker's update, `payload_bytes(numel)` bytes, the same for every worker:
for each chunk, k indices of ceil(log2(chunk)) bits each, k values of b bits each (both packed
into bytes, chunk by chunk), then one fp32 scale per chunk (none at b = 32). Nothing else travels:
the counts are fixed by (numel, chunk, k, b), which every worker knows. With "tiles" the payload
is the concatenation of each tensor's payload in that format (each padded to whole bytes, so at
most one byte per tensor more than the bits).

The exchange is whichever of two costs a worker fewer bytes for the group's size n (`exchange`):
- "gather": an all-gather of those payloads (the ring charges each worker (n - 1) payloads sent
  and received); every worker decodes all n and sums them in rank order. Its cost grows with n.
- "dense": each worker decodes its own payload into a dense fp32 vector and the group averages
  those with an fp32 all-reduce (lowband.comm.quantized_all_reduce: an all-to-all then an
  all-gather of 1/n chunks, about 2 x 4 bytes per value whatever n). The sum is the same up to
  fp32 summation order, and every worker still ends with bit-identical values.
At 1% / 2 bits a payload is 0.14 bits per value, so the gather costs 0.14 (n - 1) bits per value
against the dense path's ~64: the gather wins below about 450 workers, the dense path above
(3%: about 150). The mean (`mean`): "all" divides the sum by n, as above; "senders" divides each
coordinate by the number of workers whose top-k held it (the reference code's rule: a
coordinate only one worker sent lands at its full value), which needs the gather. A reduce-scatter of sparse sums (cheaper only while the union of indices stays
sparse after merging) is not implemented.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from lowband.comm.codecs import get_codec
from lowband.comm.group import Comm
from lowband.comm.quantized import quantized_all_reduce, quantized_all_reduce_bytes
from lowband.errors import ConfigError

LAYOUTS = ("flat", "tiles")
MEANS = ("all", "senders")


class _Exchange:
    """The exchange of payloads, shared by the flat compressor and the per-tensor one: needs
    payload_bytes(numel), unpack(payload, numel) and dense(idx, vals, numel)."""

    mean: str
    """"all": the sum of the decoded payloads over the group's size; "senders": each coordinate's
    sum over the number of workers that sent it (the reference code's mean; needs the gather)."""

    def exchange(self, numel: int, world_size: int) -> str:
        """ "gather" or "dense": whichever sends fewer bytes per worker for this group size (ties:
        the gather, which sums exactly in rank order); always the gather for mean "senders"."""
        if self.mean == "senders":
            return "gather"
        dense = quantized_all_reduce_bytes(numel, world_size, get_codec(32))
        return "dense" if dense < (world_size - 1) * self.payload_bytes(numel) else "gather"

    def average(
        self, payload: Tensor, numel: int, comm: Comm, exchange: str | None = None
    ) -> Tensor:
        """The mean of every worker's decoded payload, by the cheaper exchange for the group's
        size (or the one named): all-gather the payloads, decode, sum in rank order, divide by n
        (mean "senders": each coordinate by how many workers sent it, at least 1); or decode
        one's own and average the dense vectors with an fp32 all-reduce."""
        if (exchange or self.exchange(numel, comm.size)) == "dense":
            if self.mean == "senders":
                raise ValueError("mean 'senders' needs the gather exchange")
            own = self.dense(*self.unpack(payload, numel), numel)
            return quantized_all_reduce(comm, own, get_codec(32), op="avg")
        gathered = [torch.empty_like(payload) for _ in range(comm.size)]
        comm.all_gather(gathered, payload)
        total = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        senders = torch.zeros_like(total) if self.mean == "senders" else None
        for p in gathered:
            idx, vals = self.unpack(p, numel)
            total += self.dense(idx, vals, numel)
            if senders is not None:
                ones = (
                    [torch.ones_like(v) for v in vals]
                    if isinstance(vals, list)  # the tiles layout: one tensor per parameter
                    else torch.ones_like(vals)
                )
                senders += self.dense(idx, ones, numel)
        if senders is not None:
            return total.div_(senders.clamp_(min=1.0))
        return total.div_(comm.size)

    def exchange_bytes(self, numel: int, world_size: int) -> int:
        """Bytes one worker sends in `average`: the ring all-gather's (n - 1) payloads, or the
        dense fp32 all-reduce's, whichever `exchange` picks."""
        if self.exchange(numel, world_size) == "dense":
            return quantized_all_reduce_bytes(numel, world_size, get_codec(32))
        return (world_size - 1) * self.payload_bytes(numel)

    def as_codec(self) -> PayloadCodec:
        """This compressor's payloads seen as a codec, for the robust all-gather (--aggregate):
        every worker's update is decoded to a dense row and the rule runs over those rows."""
        return PayloadCodec(self)


class PayloadCodec:
    """A codec whose input is already a payload (the error feedback ran once, when the worker
    compressed): encode passes it through, decode is the compressor's dense view. `encoded`
    tells lowband.robust that x is the payload, not the fp32 update."""

    encoded = True

    def __init__(self, compressor: _Exchange) -> None:
        self.compressor = compressor

    def encode(self, payload: Tensor) -> Tensor:
        return payload

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        c = self.compressor
        return c.dense(*c.unpack(payload, numel), numel)

    def payload_bytes(self, numel: int) -> int:
        return self.compressor.payload_bytes(numel)


@dataclasses.dataclass(frozen=True)
class TopK(_Exchange):
    """--compress topk:FRACTION[:BITS[:LAYOUT]] (module docstring); `chunk` values per top-k.

    Its methods are the flat rule on a flat vector; `bind(shapes)` gives the compressor of one
    fragment in the spec's layout (itself for "flat"). Without shapes, `payload_bytes` of a
    "tiles" spec is the flat layout's, an estimate (lowband plan uses it)."""

    fraction: float
    bits: int = 2
    chunk: int = 4096
    layout: str = "flat"
    mean: str = "all"

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"top-k fraction must be in (0, 1], got {self.fraction}")
        if not (1 <= self.bits <= 8 or self.bits == 32):
            raise ConfigError(f"top-k value bits must be 1..8 or 32, got {self.bits}")
        if self.chunk < 2:
            raise ConfigError(f"top-k chunk must be at least 2, got {self.chunk}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"top-k layout must be flat or tiles, got {self.layout!r}")
        if self.mean not in MEANS:
            raise ConfigError(f"top-k mean must be all or senders, got {self.mean!r}")

    @classmethod
    def parse(cls, spec: str, chunk: int = 4096) -> TopK:
        """'topk:0.01', 'topk:0.01:2' or 'topk:0.01:2:tiles' (fraction, value bits, layout)."""
        parts = spec.split(":")
        usage = f"compress must be topk:FRACTION[:BITS[:flat|tiles]], got {spec!r}"
        if parts[0] != "topk" or len(parts) not in (2, 3, 4):
            raise ConfigError(usage)
        try:
            fraction = float(parts[1])
            bits = int(parts[2]) if len(parts) >= 3 else 2
        except ValueError:
            raise ConfigError(usage) from None
        return cls(fraction, bits, chunk, parts[3] if len(parts) == 4 else "flat")

    def bind(self, shapes: list[tuple[int, ...]] | list[torch.Size]) -> TopK | TiledTopK:
        """The compressor of a fragment whose flat vector concatenates tensors of these shapes:
        this one for the flat layout, a TiledTopK for "tiles"."""
        return self if self.layout == "flat" else TiledTopK(self, shapes)

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return max(1, round(self.fraction * self.chunk))

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.chunk)))

    def chunks(self, numel: int) -> int:
        return -(-numel // self.chunk)

    def payload_bytes(self, numel: int) -> int:
        n = self.chunks(numel)
        packed = -(-n * self.k * (self.index_bits + self.bits) // 8)
        return packed + (0 if self.bits == 32 else 4 * n)

    # -- compress / decompress -------------------------------------------------------------------
    def select(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(indices within each chunk [C, k] int64, quantised codes or fp32 values [C, k],
        scales [C] fp32) of a 1-D fp32 tensor; chunks past the end are zero-padded."""
        n = self.chunks(x.numel())
        padded = torch.zeros(n * self.chunk, dtype=torch.float32, device=x.device)
        padded[: x.numel()] = x
        rows = padded.view(n, self.chunk)
        # torch.topk: deterministic on a device (7x faster than the stable sort it replaced on
        # CPU, benchmarks/sparse_codec_cost.py); which of two exactly equal magnitudes is kept at
        # the k-th place is its choice. Each worker decodes what was sent, so replicas agree.
        idx = torch.topk(rows.abs(), self.k, dim=1, sorted=False).indices
        vals = torch.gather(rows, 1, idx)
        if self.bits == 32:
            return idx, vals, torch.ones(n, dtype=torch.float32, device=x.device)
        scale = vals.abs().amax(dim=1)
        levels = (1 << self.bits) - 1
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((vals / safe[:, None] + 1.0) * (levels / 2.0)).clamp_(0, levels)
        return idx, codes, scale

    def values(self, codes: Tensor, scale: Tensor) -> Tensor:
        """The values the codes stand for (what every worker decodes)."""
        if self.bits == 32:
            return codes
        levels = (1 << self.bits) - 1
        return (codes * (2.0 / levels) - 1.0) * scale[:, None]

    def dense(self, idx: Tensor, vals: Tensor, numel: int) -> Tensor:
        n = idx.shape[0]
        out = torch.zeros(n, self.chunk, dtype=torch.float32, device=vals.device)
        out.scatter_(1, idx, vals)
        return out.view(-1)[:numel]

    def compress_(self, error: Tensor, delta: Tensor, decay: float) -> Tensor:
        """Error feedback and selection, in place: e <- decay * e + delta; sent = Q(TopK(e));
        e <- e - sent. Returns the packed payload of `sent`."""
        if self.layout != "flat":
            raise ConfigError("a top-k 'tiles' compressor needs the tensors' shapes: use bind()")
        error.mul_(decay).add_(delta)
        idx, codes, scale = self.select(error)
        error.sub_(self.dense(idx, self.values(codes, scale), error.numel()))
        return self.pack(idx, codes, scale)

    # -- wire format -----------------------------------------------------------------------------
    def pack(self, idx: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
        """uint8 payload: per chunk k packed indices then k packed values, then fp32 scales."""
        if self.bits == 32:
            value_fields = codes.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        else:
            value_fields = codes.to(torch.int64)
        fields = torch.cat([idx, value_fields], dim=1)  # [C, 2k]
        widths = [self.index_bits] * self.k + [self.bits] * self.k
        bits = _to_bits(fields, torch.tensor(widths, device=idx.device))
        packed = _pack_bits(bits.reshape(-1))
        if self.bits == 32:
            return packed
        return torch.cat([packed, scale.contiguous().view(torch.uint8)])

    def unpack(self, payload: Tensor, numel: int) -> tuple[Tensor, Tensor]:
        """(indices [C, k], decoded values [C, k]) of one payload."""
        n = self.chunks(numel)
        per_chunk = self.k * (self.index_bits + self.bits)
        packed_len = -(-n * per_chunk // 8)
        bits = _unpack_bits(payload[:packed_len], n * per_chunk).view(n, per_chunk)
        widths = torch.tensor(
            [self.index_bits] * self.k + [self.bits] * self.k, device=payload.device
        )
        fields = _from_bits(bits, widths)
        idx, raw = fields[:, : self.k], fields[:, self.k :]
        if self.bits == 32:
            vals = raw.to(torch.int32).view(torch.float32)
            return idx, vals
        scale = payload[packed_len:].clone().view(torch.float32)
        return idx, self.values(raw.to(torch.float32), scale)


class TiledTopK(_Exchange):
    """TopK in the "tiles" layout, bound to one fragment's tensor shapes (TopK.bind): one flat
    TopK per tensor, with that tensor's tile size as its chunk, over its values gathered tile by
    tile. Same interface as TopK for the algorithm; `idx` and `vals` are lists, one per tensor."""

    def __init__(self, spec: TopK, shapes: list[tuple[int, ...]] | list[torch.Size]) -> None:
        self.spec = spec
        self.mean = spec.mean
        self.parts: list[tuple[TopK, Tensor]] = []
        """Per tensor: (its flat TopK, the positions of its values in the fragment's flat vector,
        in chunk order: tile by tile, row-major inside a tile)."""
        side = math.isqrt(spec.chunk)
        offset = 0
        for shape in shapes:
            n = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else 1
            cols = n // max(rows, 1)
            h, w = _divisor_at_most(rows, side), _divisor_at_most(cols, side)
            pos = torch.arange(offset, offset + n)
            if len(shape) >= 2 and h * w >= spec.chunk // 4:
                pos = pos.view(rows // h, h, cols // w, w).permute(0, 2, 1, 3).reshape(-1)
                chunk = h * w
            else:  # a vector, or a matrix whose sides have no divisor near sqrt(chunk)
                chunk = min(n, spec.chunk)
            # k is a count per chunk, the same for every chunk of every tensor (the reference
            # code's top_k): a vector of 128 values keeps min(k, 128) of them, as a tile does k.
            chunk = max(2, chunk)
            k = min(chunk, max(1, round(spec.fraction * spec.chunk)))
            part = TopK(k / chunk, spec.bits, chunk)
            assert part.k == k
            self.parts.append((part, pos))
            offset += n
        self.numel = offset

    def __repr__(self) -> str:
        return f"TiledTopK({self.spec}, {len(self.parts)} tensors)"

    def _check(self, numel: int) -> None:
        if numel != self.numel:
            raise ValueError(f"bound to {self.numel} values, got {numel}")

    def payload_bytes(self, numel: int) -> int:
        self._check(numel)
        return sum(t.payload_bytes(pos.numel()) for t, pos in self.parts)

    def compress_(self, error: Tensor, delta: Tensor, decay: float) -> Tensor:
        """TopK.compress_, tensor by tensor, each in its own tiles."""
        self._check(error.numel())
        error.mul_(decay).add_(delta)
        payloads = []
        for t, pos in self.parts:
            pos = pos.to(error.device)
            x = error[pos]
            idx, codes, scale = t.select(x)
            error[pos] = x - t.dense(idx, t.values(codes, scale), x.numel())
            payloads.append(t.pack(idx, codes, scale))
        return torch.cat(payloads)

    def unpack(self, payload: Tensor, numel: int) -> tuple[list[Tensor], list[Tensor]]:
        self._check(numel)
        idx, vals, start = [], [], 0
        for t, pos in self.parts:
            size = t.payload_bytes(pos.numel())
            i, v = t.unpack(payload[start : start + size], pos.numel())
            idx.append(i)
            vals.append(v)
            start += size
        return idx, vals

    def dense(self, idx: list[Tensor], vals: list[Tensor], numel: int) -> Tensor:
        self._check(numel)
        out = torch.zeros(numel, dtype=torch.float32, device=vals[0].device)
        for (t, pos), i, v in zip(self.parts, idx, vals, strict=True):
            out[pos.to(out.device)] = t.dense(i, v, pos.numel())
        return out


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is at most limit (the reference code's tile side)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _to_bits(fields: Tensor, widths: Tensor) -> Tensor:
    """[rows, F] non-negative ints -> [rows, sum(widths)] bits, most significant first."""
    top = int(widths.max())
    shifts = torch.arange(top - 1, -1, -1, device=fields.device)  # [top]
    bits = (fields[..., None] >> shifts) & 1  # [rows, F, top]
    keep = shifts[None, :] < widths[:, None]  # [F, top]: the low `width` bits of each field
    return bits[:, keep]


def _from_bits(bits: Tensor, widths: Tensor) -> Tensor:
    top = int(widths.max())
    shifts = torch.arange(top - 1, -1, -1, device=bits.device)
    keep = shifts[None, :] < widths[:, None]  # [F, top]
    full = torch.zeros(bits.shape[0], *keep.shape, dtype=torch.int64, device=bits.device)
    full[:, keep] = bits.to(torch.int64)
    return (full << shifts).sum(-1)


def _pack_bits(bits: Tensor) -> Tensor:
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], device=bits.device)
    return (bits.view(-1, 8) * weights).sum(1).to(torch.uint8)


def _unpack_bits(packed: Tensor, count: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, device=packed.device)
    return ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[:count]
