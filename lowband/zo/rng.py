"""A counter-based generator for zeroth-order perturbations: the same bits on every device.

Element i of a draw with key k is a pure function of (k, i): a splitmix64 hash (Steele, Lea and
Flood 2014) of i * golden + k, whose 64 bits are read as four 16-bit uniforms; z is their sum,
centred and scaled to unit variance (Irwin-Hall of order 4). Nothing but integer arithmetic happens
until the last step, (sum - 131070) converted to fp32 (exact: it is below 2^18) times one
constant (one rounding). Hence:

  * the same z on the CPU, on any GPU, eagerly or compiled by torch.compile, bit for bit (a test
    compares compiled and eager; benchmarks/gpu_step.py compares CPU and CUDA);
  * no state and no host round-trip: a parameter's z is drawn where the parameter lives, in one
    fused kernel when compiled, from (seed, its offset in the flat parameter vector);
  * any slice can be drawn alone (z of elements a..b equals the same elements of a larger draw).

Distribution: E z = 0, E z^2 = 1 (exactly, up to the 2^-16 grid), kurtosis 2.7 instead of a
Gaussian's 3, |z| <= sqrt(12). The two-point estimator needs only E z = 0 and E z z^T = I to be
unbiased as eps -> 0 (Spall's SPSA even uses +-1); MeZO draws a Gaussian, which no integer-only
recipe gives exactly. docs/zo.md says what this changes (nothing measurable in our runs) and why
the trade is worth it.

Speed. Eager, the hash is a dozen passes over an int64 tensor: about 20 ms per million elements on
one CPU thread, against 3 ms for torch.randn. Compiled (`configure(compile=True)`; `lowband
finetune --compile`, the default on GPUs) it is one kernel: 0.6 ms per million on the same thread,
and memory-bound on a GPU. The compile costs a few seconds once per process, so the CPU default
stays eager.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits (torch has no uint64 arithmetic)."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_CENTRE = 2 * 65535  # the mean of a sum of four uniforms on 0..65535
_SCALE = 1.0 / math.sqrt((65536.0**2 - 1.0) / 3.0)  # 1 / its standard deviation


def _srl(h: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> on int64 is arithmetic)."""
    return (h >> n) & ((1 << (64 - n)) - 1)


def _draw(offset: Tensor, numel: int, key: Tensor) -> Tensor:
    """z[i] for i = offset .. offset + numel - 1 under `key`, fp32, on offset's device.

    int64 multiplication wraps modulo 2^64 on every torch backend (two's complement), which is
    the unsigned arithmetic splitmix64 is defined in."""
    h = (torch.arange(numel, dtype=torch.int64, device=offset.device) + offset) * _GOLDEN + key
    h = (h ^ _srl(h, 30)) * _MIX1
    h = (h ^ _srl(h, 27)) * _MIX2
    h = h ^ _srl(h, 31)
    total = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + _srl(h, 48)
    return (total - _CENTRE).to(torch.float32) * _SCALE


def key_for(seed: int) -> int:
    """The int64 key of a seed: splitmix64's finaliser of it, so nearby seeds share no structure."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return _signed(z ^ (z >> 31))


_compiled: Callable[[Tensor, int, Tensor], Tensor] | None = None
_use_compiled = False


def configure(*, compile: bool) -> None:
    """Draw through torch.compile (one fused kernel) or eagerly. The bits are the same either way;
    only the speed differs. Process-wide, like torch.backends flags."""
    global _use_compiled
    _use_compiled = bool(compile)


def compiled_enabled() -> bool:
    return _use_compiled


def _drawer() -> Callable[[Tensor, int, Tensor], Tensor]:
    global _compiled
    if not _use_compiled:
        return _draw
    if _compiled is None:
        _compiled = torch.compile(_draw, dynamic=True, fullgraph=True)
    return _compiled


def counter_normal(
    seed: int, offset: int, shape: torch.Size | tuple[int, ...], device: torch.device | str
) -> Tensor:
    """z for the elements offset .. offset + prod(shape) - 1 of the stream of `seed`, fp32."""
    global _use_compiled
    numel = math.prod(shape)
    off = torch.tensor(int(offset), dtype=torch.int64, device=device)
    key = torch.tensor(key_for(seed), dtype=torch.int64, device=device)
    draw = _drawer()
    try:
        z = draw(off, numel, key)
    except Exception as e:  # noqa: BLE001 - no C++ compiler / triton: same bits, eagerly
        if draw is _draw:
            raise
        warnings.warn(
            f"lowband.zo: compiling the perturbation generator failed ({type(e).__name__}); "
            "drawing eagerly (same numbers, slower)",
            stacklevel=2,
        )
        _use_compiled = False
        z = _draw(off, numel, key)
    return z.view(shape)
