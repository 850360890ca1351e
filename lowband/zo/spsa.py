"""SPSA / MeZO primitives: perturb, two-point estimate, update, all driven by one integer seed.

MeZO (Malladi et al. 2023): z ~ N(0, I) is never stored. It is regenerated from a seed, parameter
by parameter in a fixed order, every time it is needed (perturb, un-perturb, update), so the
estimator needs inference memory only.

Determinism. z comes from a `torch.Generator` on the CPU seeded with `seed`, drawn in fp32 in
the order of `params`, then moved to each parameter's device and added there. The CPU generator
makes z identical on every machine and device (a CUDA generator would tie z to the device type);
the cost is one host->device copy of each parameter's z per use.

Restore. theta + eps z - 2 eps z + eps z is not theta in floating point: each add rounds. Measured
on the 2-layer dim-32 test model (tests/test_zo.py::test_arith_restore_drift), z from seed 1:
  fp32, eps=1e-3 or 1e-2: max |drift| 1.2e-7 (~1 ulp of the weights), ~46-50% of entries move;
  bf16, eps=1e-3: max |drift| 3.9e-3; eps=1e-2: 7.8e-3 (1-2 bf16 ulp), ~46-50% of entries move.
Element-wise it stays within 2 * finfo(dtype).eps * (|theta| + 2 eps |z|) (three roundings).
Hence two modes:
  restore="copy"  (default) saves the parameters once and copies them back: bit exact, one extra
                  parameter copy (still no gradients, optimizer state or stored activations);
  restore="arith" re-adds the same z (+eps): MeZO's memory, with the drift above.
Distributed ZO needs "copy": a rank that drifted would no longer match its peers bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
"""loss_fn(model, batch) -> scalar loss tensor."""


def _list(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, nn.Module):
        return list(params.parameters())
    return list(params)


def noise(params: Iterable[Tensor], seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (param, z) in order; z ~ N(0, I) fp32 from a CPU generator seeded by `seed`, on
    the parameter's device. The same seed and parameter shapes always give the same z."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    for p in params:
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu")
        yield p, z.to(p.device)


@torch.no_grad()
def perturb_(params: nn.Module | Iterable[Tensor], seed: int, scale: float) -> None:
    """theta += scale * z(seed), in place (computed in fp32, rounded once to the param dtype)."""
    for p, z in noise(_list(params), seed):
        p.add_(z, alpha=scale)


@torch.no_grad()
def spsa_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    seed: int,
    eps: float,
    *,
    restore: Literal["copy", "arith"] = "copy",
) -> float:
    """Two-point projected gradient g = (L(theta + eps z) - L(theta - eps z)) / (2 eps).

    Steps (same batch for both losses):
      1. theta += eps z;  L+ = loss_fn(model, batch)
      2. theta -= 2 eps z; L- = loss_fn(model, batch)
      3. restore theta: copy back the saved parameters ("copy", exact) or theta += eps z
         ("arith", drifts by rounding; see the module docstring).
    """
    params = _list(model)
    saved = [p.detach().clone() for p in params] if restore == "copy" else None
    if restore not in ("copy", "arith"):
        raise ValueError(f"restore must be 'copy' or 'arith', got {restore!r}")
    perturb_(params, seed, eps)
    loss_plus = float(loss_fn(model, batch))
    perturb_(params, seed, -2.0 * eps)
    loss_minus = float(loss_fn(model, batch))
    if saved is not None:
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    else:
        perturb_(params, seed, eps)
    return (loss_plus - loss_minus) / (2.0 * eps)


@torch.no_grad()
def apply_update_(
    params: nn.Module | Iterable[Tensor], seed: int, g: float, lr: float, wd: float = 0.0
) -> None:
    """theta -= lr * (g * z(seed) + wd * theta), in place.

    Computed as theta *= (1 - lr wd); theta += (-lr g) z: the same rule, and the same rounding on
    every rank because every rank runs these exact operations in the same order.
    """
    for p, z in noise(_list(params), seed):
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_(z, alpha=-lr * g)
