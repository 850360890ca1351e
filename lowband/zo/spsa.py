"""SPSA / MeZO primitives: perturb, two-point estimate, update, all driven by one integer seed.

MeZO (Malladi et al. 2023): z (mean 0, covariance I) is never stored. It is regenerated from a seed, parameter
by parameter in a fixed order, every time it is needed (perturb, un-perturb, update), so the
estimator needs inference memory only.

Determinism. z comes from a counter-based generator (lowband.zo.rng): element j of parameter i
is a pure function of (seed, its offset in the flat vector of `params`), drawn on the parameter's
device in integer arithmetic, so z is the same bits on every machine and device, eager or
compiled, with no host round-trip.

Restore. theta + eps z - 2 eps z + eps z is not theta in floating point: each add rounds. Measured
on the 2-layer dim-32 test model (tests/test_zo.py::test_arith_restore_drift), z from seed 1:
  fp32, eps=1e-3 or 1e-2: max |drift| 1.2e-7 (~1 ulp of the weights), ~46-50% of entries move;
  bf16, eps=1e-3: max |drift| 3.9e-3; eps=1e-2: 7.8e-3 (1-2 bf16 ulp), ~46-50% of entries move.
Element-wise it stays within 2 * finfo(dtype).eps * (|theta| + 2 eps |z|) (three roundings).
Hence three modes:
  restore="copy"  (default) saves the parameters and copies them back after each perturbed
                  forward: bit exact, one extra parameter copy on the parameters' device (still no
                  gradients, optimizer state or stored activations);
  restore="host"  the same, but the saved copy lives in host memory: bit exact with the
                  accelerator holding only what inference needs, at the price of a device->host and
                  a host->device copy of the parameters per forward;
  restore="arith" re-adds the same z: MeZO's memory, with the drift above.
Distributed ZO needs an exact mode: a rank that drifted would no longer match its peers bit for bit.

Exact modes evaluate L- at round(theta - eps z), one rounding from theta, the same point a rank of
a perturbation-parallel pair reaches (lowband.zo.distributed); "arith" evaluates it at
round(round(theta + eps z) - 2 eps z), as MeZO does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lowband.zo.rng import counter_normal

LossFn = Callable[[nn.Module, Any], Tensor]
"""loss_fn(model, batch) -> scalar loss tensor."""
Restore = Literal["copy", "host", "arith"]
RESTORE_MODES: tuple[str, ...] = get_args(Restore)


def _list(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, nn.Module):
        return list(params.parameters())
    return list(params)


def noise(params: Iterable[Tensor], seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (param, z) in order; z fp32 with mean 0 and unit variance (lowband.zo.rng), drawn on
    the parameter's device. The same seed and parameter shapes always give the same z."""
    offset = 0
    for p in params:
        yield p, counter_normal(seed, offset, p.shape, p.device)
        offset += p.numel()


@torch.no_grad()
def perturb_(params: nn.Module | Iterable[Tensor], seed: int, scale: float) -> None:
    """theta += scale * z(seed), in place (computed in fp32, rounded once to the param dtype)."""
    for p, z in noise(_list(params), seed):
        p.add_(z, alpha=scale)


def _check_restore(restore: str) -> None:
    if restore not in RESTORE_MODES:
        raise ValueError(f"restore must be one of {', '.join(RESTORE_MODES)}, got {restore!r}")


def _save(params: list[Tensor], restore: str) -> list[Tensor]:
    if restore == "host":
        return [p.detach().to("cpu", copy=True) for p in params]
    return [p.detach().clone() for p in params]


@torch.no_grad()
def perturbed_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    seed: int,
    scale: float,
    *,
    restore: Literal["copy", "host"] = "copy",
) -> float:
    """L(theta + scale z(seed)) with theta restored exactly afterwards (a saved copy, see above).

    One half of a two-point estimate: a perturbation-parallel rank computes only its sign's half.
    """
    if restore not in ("copy", "host"):
        raise ValueError(f"perturbed_loss restores exactly: 'copy' or 'host', got {restore!r}")
    params = _list(model)
    saved = _save(params, restore)
    perturb_(params, seed, scale)
    loss = float(loss_fn(model, batch))
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)
    return loss


def two_point(loss_plus: float, loss_minus: float, eps: float) -> float:
    """g = (L+ - L-) / (2 eps): the one formula every mode uses, so they round alike."""
    return (loss_plus - loss_minus) / (2.0 * eps)


@torch.no_grad()
def spsa_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    seed: int,
    eps: float,
    *,
    restore: Restore = "copy",
) -> tuple[float, float]:
    """(L(theta + eps z), L(theta - eps z)) on the same batch, theta restored (see `restore`)."""
    _check_restore(restore)
    if restore != "arith":
        return (
            perturbed_loss(model, loss_fn, batch, seed, eps, restore=restore),
            perturbed_loss(model, loss_fn, batch, seed, -eps, restore=restore),
        )
    params = _list(model)
    perturb_(params, seed, eps)
    loss_plus = float(loss_fn(model, batch))
    perturb_(params, seed, -2.0 * eps)
    loss_minus = float(loss_fn(model, batch))
    perturb_(params, seed, eps)
    return loss_plus, loss_minus


def spsa_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    seed: int,
    eps: float,
    *,
    restore: Restore = "copy",
) -> float:
    """Two-point projected gradient g = (L(theta + eps z) - L(theta - eps z)) / (2 eps).

    Same batch for both losses. Exact modes ("copy", "host"): theta + eps z, L+, restore;
    theta - eps z, L-, restore. "arith": theta += eps z, L+; theta -= 2 eps z, L-; theta += eps z
    (drifts by rounding; see the module docstring).
    """
    return two_point(*spsa_losses(model, loss_fn, batch, seed, eps, restore=restore), eps)


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
