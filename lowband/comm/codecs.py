"""Codecs: a 1-D fp32 tensor to a compact byte payload and back (DiLoCo's outer gradients).

Every payload is a 1-D uint8 tensor, a pure byte buffer: it can be sliced out of, or copied into,
a larger buffer, which is how `lowband.comm.quantized` packs one payload per peer into a single
all_to_all. Rounding is deterministic round-to-nearest(-even), never stochastic, so every rank
that decodes the same bytes gets the same floats, bit for bit.

    name  bits  payload bytes for n elements   error bound |decode(encode(x)) - x|, elementwise
    fp32   32   4n                             0
    bf16   16   2n                             2^-8  |x| + 2^-134   (inf where |x| > bf16 max)
    fp16   16   2n                             2^-11 |x| + 2^-25    (inf where |x| > 65504)
    int8    8   n + 4 ceil(n/B)                step/2 + 2^-22 absmax + 2^-126,  step = absmax/127
    int4    4   ceil(n/2) + 4 ceil(n/B)        step/2 + 2^-22 absmax + 2^-126,  step = absmax/7

Casts (bf16, fp16): the unit roundoff of a p-bit significand is 2^-p (p = 8 for bf16, 11 for
fp16); the constant is half the smallest subnormal, the error floor near zero. These are plain
casts: a finite value beyond the format's range becomes inf, and its bound is reported as inf.

Blockwise absmax (int8, int4): x is cut into blocks of B = block_size consecutive elements (the
last block may be short; n need not divide by B). Per block, absmax = max |x| and
step = absmax / qmax with qmax = 2^(bits-1) - 1 (127 or 7). Each value is stored as
q = round(x / step) in [-qmax, qmax] and decodes to q * step, so in exact arithmetic the error is
at most step/2. The fp32 rounding of x / step and of q * step adds at most 2^-23 absmax (we
allow 2^-22), and 2^-126 covers blocks whose absmax is subnormal (step underflows). A NaN or inf
in a block makes the whole block decode to NaN: a diverged gradient is not hidden.

The per-block step is stored as fp32, 4 bytes per block (0.5 bit per element at B = 64, so int8
costs 8.5 bits per element and int4 4.5), and counted in payload_bytes. fp16 scales were
considered and rejected: fp16's normal range ends at 6.1e-5, below which outer gradients often
sit, and a subnormal scale loses the relative precision the bound above relies on. A bf16 scale
would add up to 2^-9 absmax per element, doubling int8's error.

Blockwise layout: [ceil(n/B) fp32 steps, host byte order][values]. int8 values are one int8 per
byte; int4 values are stored as the nibble q + 8 (1..15), element 2i in the low nibble of byte i
and element 2i+1 in the high nibble; an odd n leaves the last high nibble at 8 (zero).

Not implemented: the 4-bit float of the Streaming DiLoCo paper (arXiv 2501.18512). The copies of
the paper reachable here say "FP4" / "4-bit floats" (Table 1, Figure 11) but not its bit layout
(E3M0 or E2M1), so it is left out rather than guessed.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lowband.errors import ConfigError

__all__ = ["BlockwiseIntCodec", "CastCodec", "Codec", "Float32Codec", "get_codec"]


@runtime_checkable
class Codec(Protocol):
    """Turns a 1-D fp32 tensor into a uint8 payload and back."""

    name: str
    """"fp32", "bf16", "fp16", "int8" or "int4"."""
    bits: int
    """Bits per value, not counting per-block scales (see payload_bytes for the exact size)."""
    block_size: int
    """Alignment unit: a tensor cut at multiples of block_size encodes piecewise exactly as a
    whole (1 for elementwise codecs)."""

    def encode(self, x: Tensor) -> Tensor:
        """1-D fp32 -> 1-D uint8 payload of payload_bytes(x.numel()) bytes (new memory)."""
        ...

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """1-D uint8 payload -> 1-D fp32 tensor of numel elements (never aliases the payload)."""
        ...

    def payload_bytes(self, numel: int) -> int:
        """Exact size in bytes of encode(x) for x of numel elements."""
        ...

    def error_bound(self, x: Tensor) -> Tensor:
        """Elementwise bound on |decode(encode(x)) - x| (formulas in the module docstring)."""
        ...


# -- helpers -------------------------------------------------------------------------------------
def _check_input(x: Tensor) -> None:
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"codecs encode a 1-D float32 tensor, got a {x.dim()}-D {x.dtype} one")


def _check_payload(codec: Codec, payload: Tensor, numel: int) -> None:
    expected = codec.payload_bytes(numel)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
        raise ValueError(
            f"{codec.name} payload for {numel} elements must be 1-D uint8 of {expected} bytes, "
            f"got {payload.dim()}-D {payload.dtype} of {payload.numel()}"
        )


def _view_as(payload: Tensor, dtype: torch.dtype) -> Tensor:
    """View a uint8 byte range as `dtype`, copying only if its offset is misaligned for dtype."""
    itemsize = dtype.itemsize
    if payload.storage_offset() % itemsize or not payload.is_contiguous():
        payload = payload.clone(memory_format=torch.contiguous_format)
    return payload.view(dtype)


# -- codecs --------------------------------------------------------------------------------------
class Float32Codec:
    """The identity on fp32 values: 4 bytes per element, exact."""

    name = "fp32"
    bits = 32
    block_size = 1

    def encode(self, x: Tensor) -> Tensor:
        _check_input(x)
        return x.clone(memory_format=torch.contiguous_format).view(torch.uint8)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        _check_payload(self, payload, numel)
        return _view_as(payload, torch.float32).clone()

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel

    def error_bound(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def __repr__(self) -> str:
        return "Float32Codec()"


class CastCodec:
    """A plain cast to a 16-bit float (round to nearest even), its bytes as the payload."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"CastCodec casts to bfloat16 or float16, not {dtype}")
        info = torch.finfo(dtype)
        self.name, self.dtype, self.bits, self.block_size = name, dtype, info.bits, 1
        # Unit roundoff 2^-p of a p-bit significand (finfo.eps is 2^(1-p)); half the smallest
        # subnormal is the absolute error floor near zero.
        self._unit_roundoff = info.eps / 2
        self._floor = info.smallest_normal * info.eps / 2
        self._max = info.max

    def encode(self, x: Tensor) -> Tensor:
        _check_input(x)
        return x.to(self.dtype).view(torch.uint8)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        _check_payload(self, payload, numel)
        return _view_as(payload, self.dtype).to(torch.float32)

    def payload_bytes(self, numel: int) -> int:
        return 2 * numel

    def error_bound(self, x: Tensor) -> Tensor:
        ax = x.abs()
        bound = ax * self._unit_roundoff + self._floor
        return torch.where(ax > self._max, math.inf, bound)

    def __repr__(self) -> str:
        return f"CastCodec({self.name!r}, {self.dtype})"


class BlockwiseIntCodec:
    """Blockwise absmax integer quantization, int8 (one value a byte) or int4 (two a byte)."""

    _STEP_BYTES = 4  # per-block step stored as fp32 (module docstring says why)

    def __init__(self, bits: int, block_size: int = 64) -> None:
        if bits not in (8, 4):
            raise ValueError(f"BlockwiseIntCodec supports 8 or 4 bits, not {bits}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"codec block_size must be a positive integer, got {block_size!r}")
        self.bits, self.block_size = bits, block_size
        self.name = f"int{bits}"
        self.qmax = 2 ** (bits - 1) - 1

    # sizes
    def _nblocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _value_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else (numel + 1) // 2

    def payload_bytes(self, numel: int) -> int:
        return self._STEP_BYTES * self._nblocks(numel) + self._value_bytes(numel)

    # blocks
    def _blocks(self, x: Tensor) -> Tensor:
        """x as [nblocks, block_size], zero-padded (zeros change no block's absmax)."""
        nb = self._nblocks(x.numel())
        pad = nb * self.block_size - x.numel()
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(nb, self.block_size)

    def _steps(self, xb: Tensor) -> tuple[Tensor, Tensor]:
        absmax = xb.abs().amax(dim=1)
        return absmax, absmax / self.qmax

    def encode(self, x: Tensor) -> Tensor:
        _check_input(x)
        n, nb = x.numel(), self._nblocks(x.numel())
        xb = self._blocks(x)
        _, step = self._steps(xb)
        safe = torch.where(step > 0, step, 1.0)  # all-zero block (or underflowed step): q = 0
        q = torch.round(xb / safe[:, None]).clamp_(-self.qmax, self.qmax).reshape(-1)[:n]
        payload = torch.empty(self.payload_bytes(n), dtype=torch.uint8, device=x.device)
        split = self._STEP_BYTES * nb
        payload[:split] = step.view(torch.uint8)
        if self.bits == 8:
            payload[split:] = q.to(torch.int8).view(torch.uint8)
        else:
            nib = (q + 8).to(torch.uint8)  # 1..15
            if n % 2:
                nib = torch.cat((nib, nib.new_full((1,), 8)))
            payload[split:] = nib[0::2] | (nib[1::2] << 4)
        return payload

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        _check_payload(self, payload, numel)
        nb = self._nblocks(numel)
        split = self._STEP_BYTES * nb
        step = _view_as(payload[:split], torch.float32)
        raw = payload[split:]
        if self.bits == 8:
            q = raw.view(torch.int8).to(torch.float32)
        else:
            q = torch.stack((raw & 15, raw >> 4), dim=1).reshape(-1)[:numel].to(torch.float32) - 8
        return (self._blocks(q) * step[:, None]).reshape(-1)[:numel].clone()

    def error_bound(self, x: Tensor) -> Tensor:
        absmax, step = self._steps(self._blocks(x))
        bound = step / 2 + absmax * 2.0**-22 + 2.0**-126
        return bound.repeat_interleave(self.block_size)[: x.numel()]

    def __repr__(self) -> str:
        return f"BlockwiseIntCodec(bits={self.bits}, block_size={self.block_size})"


_NAMES = {32: "fp32", 16: "bf16", 8: "int8", 4: "int4"}


def get_codec(bits: int | str, block_size: int = 64) -> Codec:
    """32 -> fp32, 16 -> bf16 ("fp16" for IEEE half), 8 -> int8 blockwise, 4 -> int4 blockwise.

    Names ("fp32", "bf16", "fp16", "int8", "int4") are accepted too; block_size applies to the
    blockwise codecs. Anything else raises ConfigError.
    """
    name = bits.strip().lower() if isinstance(bits, str) else bits
    if isinstance(name, int) and not isinstance(name, bool):
        name = _NAMES.get(name, name)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ConfigError(f"codec block_size must be a positive integer, got {block_size!r}")
    if name == "fp32":
        return Float32Codec()
    if name == "bf16":
        return CastCodec("bf16", torch.bfloat16)
    if name == "fp16":
        return CastCodec("fp16", torch.float16)
    if name == "int8":
        return BlockwiseIntCodec(8, block_size)
    if name == "int4":
        return BlockwiseIntCodec(4, block_size)
    raise ConfigError(
        f"unknown codec {bits!r}: expected bits 32, 16, 8 or 4, or fp32, bf16, fp16, int8, int4"
    )
