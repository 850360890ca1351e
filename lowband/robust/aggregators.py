"""Byzantine-robust aggregation rules: n workers' update vectors in, one vector out.

Every rule is a pure function of a stacked tensor `updates_NV` (N = workers, V = the flattened
update, fp32 or fp64) returning the aggregate of shape (V,) in the input's dtype. f is the number
of Byzantine workers a rule is asked to tolerate; a rule whose precondition on (n, f) fails
raises lowband.errors.ConfigError naming it.

    rule               precondition    cost            source
    mean               -               O(nd)           -
    coordinate_median  -               O(nd log n)     Yin et al. 2018
    trimmed_mean(f)    n > 2f          O(nd log n)     Yin et al. 2018 (drop f each side)
    krum(f)            n > 2f + 2      O(n^2 d)        Blanchard et al. 2017
    multi_krum(f, m)   n > 2f + 2      O(n^2 d)        Blanchard et al. 2017 / El Mhamdi et al. 2018
    bulyan(f)          n >= 4f + 3     O(n^2 d)        El Mhamdi, Guerraoui, Rouault 2018
    geometric_median   -               O(nd) per iter  smoothed Weiszfeld (Pillutla et al., RFA)
    centered_clipping  -               O(nd) per iter  Karimireddy, He, Jaggi 2021
    flag_aggregator    -               O(n^2 d)        Almasi et al. 2023 (lowband.robust.flag)

Conventions the textbook leaves open, and what we chose:
- coordinate_median of an even count is the mean of the two middle values (numpy's and ByzFL's
  median), not torch.median's lower one.
- Krum scores a vector by the sum of squared distances to its n - f - 2 nearest neighbours, as
  Blanchard et al. do. ByzFL uses n - f - 1 (pass neighbours= to reproduce it). Ties go to the
  lowest index. A non-finite distance counts as +inf.
- Pairwise distances come from a fp64 Gram matrix computed in chunks of V, so d may be large.
- Bulyan selects theta = n - 2f vectors by Krum on the shrinking remaining set (with
  max(|R| - f - 2, 0) neighbours), then averages, per coordinate, the beta = theta - 2f selected
  values closest to their median.
- geometric_median minimises sum_i max(nu, ||x_i - z||) style smoothed distances by Weiszfeld
  steps z <- sum_i b_i x_i / sum_i b_i, b_i = 1 / max(nu, ||x_i - z||), from the mean, until the
  step is below tol * ||z|| or max_iters.
- centered_clipping: v <- v + mean_i clip_tau(x_i - v), `iters` times, from `reference` (the
  previous aggregate in the paper; zeros if None, as in ByzFL). tau=None picks tau as the median
  of ||x_i - reference|| (our choice: the paper tunes tau by hand; this keeps it scale free).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lowband.errors import ConfigError

__all__ = [
    "AGGREGATORS",
    "CenteredClipping",
    "bulyan",
    "centered_clipping",
    "check_tolerance",
    "coordinate_median",
    "geometric_median",
    "get_aggregator",
    "krum",
    "krum_scores",
    "mean",
    "multi_krum",
    "pairwise_sq_distances",
    "trimmed_mean",
]

_GRAM_CHUNK = 1 << 20  # columns of V per fp64 block: bounds the fp64 copy to n * 8 MiB


# -- helpers -------------------------------------------------------------------------------------
def _check_updates(updates_NV: Tensor) -> tuple[int, int]:
    if updates_NV.dim() != 2 or not updates_NV.is_floating_point():
        raise ValueError(
            f"aggregators take a 2-D float tensor (workers x values), got "
            f"{updates_NV.dim()}-D {updates_NV.dtype}"
        )
    n, d = updates_NV.shape
    if n < 1:
        raise ValueError("aggregators need at least one update")
    return n, d


def _check_f(f: int) -> None:
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ConfigError(f"byzantine tolerance f must be a non-negative integer, got {f!r}")


def gram64(updates_NV: Tensor) -> Tensor:
    """G[i, j] = <x_i, x_j> in fp64, accumulated over chunks of V (no full fp64 copy)."""
    n, d = _check_updates(updates_NV)
    g = torch.zeros(n, n, dtype=torch.float64, device=updates_NV.device)
    for start in range(0, d, _GRAM_CHUNK):
        blk = updates_NV[:, start : start + _GRAM_CHUNK].to(torch.float64)
        g += blk @ blk.T
    return g


def pairwise_sq_distances(updates_NV: Tensor) -> Tensor:
    """D[i, j] = ||x_i - x_j||^2 (fp64, n x n, zero diagonal; non-finite entries become +inf)."""
    g = gram64(updates_NV)
    sq = g.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * g).clamp_min_(0)
    # A Gram matrix from a matmul need not be bitwise symmetric; D must be, or two updates whose
    # nearest neighbour is each other get different Krum scores and a tie breaks by rounding.
    dist = (dist + dist.T) / 2
    dist.fill_diagonal_(0)
    return torch.where(torch.isfinite(dist), dist, torch.inf)


# -- rules ---------------------------------------------------------------------------------------
def mean(updates_NV: Tensor) -> Tensor:
    """Plain average: what data parallel computes, and what one Byzantine worker can steer anywhere."""
    _check_updates(updates_NV)
    return updates_NV.mean(dim=0)


def coordinate_median(updates_NV: Tensor) -> Tensor:
    """Per-coordinate median; for an even n the mean of the two middle values."""
    n, _ = _check_updates(updates_NV)
    s = updates_NV.sort(dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(updates_NV: Tensor, f: int) -> Tensor:
    """Per coordinate, drop the f largest and f smallest values and average the n - 2f left."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("trimmed_mean", n, f)
    if f == 0:
        return updates_NV.mean(dim=0)
    return updates_NV.sort(dim=0).values[f : n - f].mean(dim=0)


def krum_scores(sq_dist: Tensor, neighbours: int) -> Tensor:
    """Score_i = sum of the `neighbours` smallest squared distances from i to the others."""
    n = sq_dist.shape[0]
    if not 0 <= neighbours <= n - 1:
        raise ConfigError(f"krum needs 0 <= neighbours <= n - 1 = {n - 1}, got {neighbours}")
    off = sq_dist.clone()
    off.fill_diagonal_(torch.inf)  # a vector is not its own neighbour
    return off.sort(dim=1).values[:, :neighbours].sum(dim=1)


def _krum_neighbours(n: int, f: int, neighbours: int | None) -> int:
    return n - f - 2 if neighbours is None else neighbours


def krum(updates_NV: Tensor, f: int, neighbours: int | None = None) -> Tensor:
    """The update whose n - f - 2 nearest neighbours are closest (sum of squared distances)."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("krum", n, f)
    scores = krum_scores(pairwise_sq_distances(updates_NV), _krum_neighbours(n, f, neighbours))
    return updates_NV[int(torch.argmin(scores))].clone()  # argmin: first of equal scores


def multi_krum(
    updates_NV: Tensor, f: int, m: int | None = None, neighbours: int | None = None
) -> Tensor:
    """Average of the m updates with the best Krum scores (m defaults to n - f)."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("multi_krum", n, f)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ConfigError(f"multi_krum needs 1 <= m <= n = {n}, got m = {m}")
    scores = krum_scores(pairwise_sq_distances(updates_NV), _krum_neighbours(n, f, neighbours))
    order = torch.sort(scores, stable=True).indices[:m]
    return updates_NV[order.sort().values].mean(dim=0)


def bulyan(updates_NV: Tensor, f: int) -> Tensor:
    """Krum-select theta = n - 2f updates, then average the beta = theta - 2f values closest to
    the coordinate-wise median of the selection."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("bulyan", n, f)
    dist = pairwise_sq_distances(updates_NV)
    remaining = list(range(n))
    selected: list[int] = []
    for _ in range(n - 2 * f):
        sub = dist[remaining][:, remaining]
        scores = krum_scores(sub, max(len(remaining) - f - 2, 0))
        selected.append(remaining.pop(int(torch.argmin(scores))))
    sel = updates_NV[sorted(selected)]
    beta = len(selected) - 2 * f
    med = coordinate_median(sel)
    closest = (sel - med).abs().topk(beta, dim=0, largest=False).indices
    return sel.gather(0, closest).mean(dim=0)


def geometric_median(
    updates_NV: Tensor,
    nu: float = 1e-6,
    tol: float = 1e-7,
    max_iters: int = 100,
) -> Tensor:
    """Smoothed Weiszfeld iterations for argmin_z sum_i ||x_i - z||, started at the mean.

    nu floors each distance (the smoothing of Pillutla et al.'s RFA), so a z that lands on a data
    point does not divide by zero.
    """
    _check_updates(updates_NV)
    if nu <= 0 or tol <= 0 or max_iters < 1:
        raise ConfigError("geometric_median needs nu > 0, tol > 0 and max_iters >= 1")
    z = updates_NV.mean(dim=0)
    for _ in range(max_iters):
        b = 1.0 / torch.linalg.vector_norm(updates_NV - z, dim=1).clamp_min(nu)
        z_next = (b[:, None] * updates_NV).sum(dim=0) / b.sum()
        step = torch.linalg.vector_norm(z_next - z)
        z = z_next
        if step <= tol * max(float(torch.linalg.vector_norm(z)), nu):
            break
    return z


def centered_clipping(
    updates_NV: Tensor,
    tau: float | None = None,
    iters: int = 1,
    reference: Tensor | None = None,
) -> Tensor:
    """v <- v + (1/n) sum_i clip_tau(x_i - v), `iters` times from v = reference (zeros if None).

    clip_tau(z) = z * min(1, tau / ||z||). tau=None: the median of ||x_i - reference||.
    """
    n, d = _check_updates(updates_NV)
    if iters < 1:
        raise ConfigError(f"centered_clipping needs iters >= 1, got {iters}")
    v = (
        torch.zeros(d, dtype=updates_NV.dtype, device=updates_NV.device)
        if reference is None
        else reference.to(updates_NV.device, updates_NV.dtype).clone()
    )
    if tau is None:
        dists = torch.linalg.vector_norm(updates_NV - v, dim=1)
        tau = float(dists.sort().values[(n - 1) // 2])  # lower median: one of the distances
    if tau < 0:
        raise ConfigError(f"centered_clipping needs tau >= 0, got {tau}")
    for _ in range(iters):
        diff = updates_NV - v
        norm = torch.linalg.vector_norm(diff, dim=1)
        scale = torch.where(norm > tau, tau / norm.clamp_min(torch.finfo(norm.dtype).tiny), 1.0)
        v = v + (diff * scale[:, None]).mean(dim=0)
    return v


class CenteredClipping:
    """Stateful centered clipping, as the paper runs it: each call's reference is the previous
    call's output (zeros at first). Identical on every rank that sees the same inputs."""

    def __init__(self, tau: float | None = None, iters: int = 1) -> None:
        self.tau, self.iters = tau, iters
        self.reference: Tensor | None = None

    def __call__(self, updates_NV: Tensor) -> Tensor:
        out = centered_clipping(updates_NV, self.tau, self.iters, self.reference)
        self.reference = out.clone()
        return out

    def __repr__(self) -> str:
        return f"CenteredClipping(tau={self.tau}, iters={self.iters})"


# -- preconditions and registry ------------------------------------------------------------------
_PRECONDITIONS: dict[str, tuple[Callable[[int, int], bool], str]] = {
    "trimmed_mean": (lambda n, f: n > 2 * f, "n > 2f"),
    "krum": (lambda n, f: n > 2 * f + 2, "n > 2f + 2"),
    "multi_krum": (lambda n, f: n > 2 * f + 2, "n > 2f + 2"),
    "bulyan": (lambda n, f: n >= 4 * f + 3, "n >= 4f + 3"),
}


def check_tolerance(name: str, n: int, f: int) -> None:
    """Raise ConfigError if rule `name` cannot tolerate f Byzantine workers out of n."""
    name = name.strip().lower().replace("-", "_")
    name = _ALIASES.get(name, name)
    pre = _PRECONDITIONS.get(name)
    if pre is not None and not pre[0](n, f):
        raise ConfigError(
            f"{name} tolerates f Byzantine workers only when {pre[1]}: got n = {n}, f = {f}"
        )


def _flag(*args: Any, **kwargs: Any) -> Tensor:
    from lowband.robust.flag import flag_aggregator  # flag imports this module's helpers

    return flag_aggregator(*args, **kwargs)


AGGREGATORS: dict[str, Callable[..., Tensor]] = {
    "mean": mean,
    "coordinate_median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multi_krum": multi_krum,
    "bulyan": bulyan,
    "geometric_median": geometric_median,
    "centered_clipping": centered_clipping,
    "flag_aggregator": _flag,
}
"""name -> pure rule. Rules with an `f` parameter take it from get_aggregator."""

_ALIASES = {
    "avg": "mean",
    "average": "mean",
    "median": "coordinate_median",
    "trmean": "trimmed_mean",
    "multikrum": "multi_krum",
    "geomed": "geometric_median",
    "cc": "centered_clipping",
    "flag": "flag_aggregator",
    "fa": "flag_aggregator",
}
_TAKES_F = {"trimmed_mean", "krum", "multi_krum", "bulyan"}


def _params(name: str) -> set[str]:
    if name == "flag_aggregator":
        from lowband.robust.flag import flag_aggregator

        fn = flag_aggregator
    else:
        fn = AGGREGATORS[name]
    return set(list(inspect.signature(fn).parameters)[1:])


def get_aggregator(
    name: str, f: int = 0, n: int | None = None, **kwargs: Any
) -> Callable[[Tensor], Tensor]:
    """The rule `name` as a callable updates_NV -> aggregate, with f and kwargs bound.

    n, if given, checks the rule's precondition on (n, f) now rather than at the first call.
    "centered_clipping" returns a CenteredClipping object that carries its reference from call to
    call (unless reference= is passed). Unknown names or keyword arguments raise ConfigError.
    """
    key = name.strip().lower().replace("-", "_")  # CLI spelling: trimmed-mean
    key = _ALIASES.get(key, key)
    if key not in AGGREGATORS:
        raise ConfigError(
            f"unknown aggregator {name!r}: expected one of {', '.join(sorted(AGGREGATORS))}"
        )
    _check_f(f)
    if key not in _TAKES_F and key != "mean" and f and n is not None and 2 * f >= n:
        raise ConfigError(f"{key} cannot tolerate f = {f} of n = {n} workers (needs 2f < n)")
    if n is not None:
        check_tolerance(key, n, f)
    unknown = set(kwargs) - _params(key) - {"f"}
    if unknown:
        raise ConfigError(
            f"aggregator {key} has no option(s) {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(_params(key) - {'f'})) or 'none'}"
        )
    if key == "centered_clipping" and "reference" not in kwargs:
        return CenteredClipping(**kwargs)
    if key in _TAKES_F:
        kwargs["f"] = f
    return functools.partial(AGGREGATORS[key], **kwargs)
