"""Encoding of the one scalar a ZO rank sends: one byte (log scale) or four (fp32).

One byte ("Just One Byte (per gradient)", Zelikman et al. 2023; ALGORITHMS.md):
p = round(16 ln|g|) is the log-magnitude in steps of 1/16 nat, so decoding sign * e^(p/16)
has relative error at most e^(1/32) - 1 (~3.2%) inside the representable range.

Byte layout. A sign and p in [-127, 127] (255 values) cannot share 8 bits, so the byte is
  bit 7      sign (1 = negative)
  bits 0-6   m in 1..127, p = m - 64 + center, i.e. p in [center - 63, center + 63]
  0x00/0x80  exactly zero (g == 0; also what a zero encodes to)
With the default center 0, |g| is representable in [e^(-63/16), e^(63/16)] = [0.0195, 51.4].
Magnitudes outside are clamped to the nearest end (never flushed to zero, so the sign survives);
`center` shifts the window by whole steps for tasks whose |g| lives elsewhere. NaN raises.

fp32: the value rounded to IEEE single precision, little-endian, 4 bytes; decoded exactly.
Every rank, the sender included, uses the decoded value, so all apply identical updates.
"""

from __future__ import annotations

import math
import struct

_STEPS_PER_NAT = 16
_HALF = 63  # p - center in [-63, 63]
_ZERO = 0


def encode(g: float, bits: int = 8, *, center: int = 0) -> bytes:
    """Scalar -> 1 byte (bits=8) or 4 bytes (bits=32)."""
    g = float(g)
    if math.isnan(g):
        raise ValueError("cannot encode NaN")
    if bits == 32:
        return struct.pack("<f", max(-3.4028234663852886e38, min(3.4028234663852886e38, g)))
    if bits != 8:
        raise ValueError(f"bits must be 8 or 32, got {bits}")
    if g == 0.0:
        return bytes([_ZERO])
    rel = round(_STEPS_PER_NAT * math.log(abs(g))) - center if math.isfinite(g) else _HALF
    m = max(-_HALF, min(_HALF, rel)) + 64  # 1..127
    return bytes([m | (0x80 if g < 0 else 0)])


def decode(code: bytes, bits: int = 8, *, center: int = 0) -> float:
    """Inverse of `encode` (up to its rounding)."""
    if bits == 32:
        return struct.unpack("<f", bytes(code))[0]
    if bits != 8:
        raise ValueError(f"bits must be 8 or 32, got {bits}")
    (b,) = bytes(code)
    m = b & 0x7F
    if m == 0:
        return 0.0
    sign = -1.0 if b & 0x80 else 1.0
    return sign * math.exp((m - 64 + center) / _STEPS_PER_NAT)


def nbytes(bits: int) -> int:
    return {8: 1, 32: 4}[bits]
