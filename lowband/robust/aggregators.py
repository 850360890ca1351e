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

Non-finite and absurd updates (issue #20: one such row used to turn geomed, centered clipping and
the flag aggregator into NaN or a crash):
- A row with any NaN or inf is Byzantine by definition: every rule drops it first (finite_rows)
  and runs on the rows left, with f lowered by the number dropped (they were among the f), so the
  rule's precondition on (n, f) still holds and Krum's neighbour count, n - f - 2, is unchanged.
  No row left: the rule returns zeros (no update), never NaN.
- Finite but absurd rows (fp32 entries near 1e19 at d = 1000, fp64 near 1e300) must not overflow
  a sum of squares: where one could (geomed's and centered clipping's norms, the flag Gram
  matrix), each row is first divided by a power of two near its largest entry. That is exact,
  and below the overflow bound nothing changes. Krum's fp64 distances map an overflow to +inf.

Conventions the textbook leaves open, and what we chose:
- coordinate_median of an even count is the mean of the two middle values (numpy's and ByzFL's
  median), not torch.median's lower one.
- Krum scores a vector by the sum of squared distances to its n - f - 2 nearest neighbours, as
  Blanchard et al. do. ByzFL uses n - f - 1 (pass neighbours= to reproduce it). A non-finite
  distance counts as +inf.
- Ties (Krum, Multi-Krum, Bulyan's Krum steps) go to the lexicographically smallest row, compared
  by value from the first coordinate on (row_order), not to the lowest index, so no rule depends
  on the order in which the workers' rows arrive. Distances are computed with the rows in that
  order too, so tied scores are tied bit for bit whatever the input order.
- Pairwise distances come from a fp64 Gram matrix computed in chunks of V, so d may be large.
- Bulyan selects theta = n - 2f vectors by Krum on the shrinking remaining set (with
  max(|R| - f - 2, 0) neighbours), then averages, per coordinate, the beta = theta - 2f selected
  values closest to their median (equally close: the smaller value first).
- geometric_median minimises sum_i max(nu, ||x_i - z||) style smoothed distances by Weiszfeld
  steps z <- sum_i b_i x_i / sum_i b_i, b_i = 1 / max(nu, ||x_i - z||), from zero as ByzFL does
  (not from the mean: one absurd row drags the mean so far that Weiszfeld's linear convergence
  takes hundreds of steps to come back), until the step is below tol * ||z|| or max_iters.
- centered_clipping: v <- v + mean_i clip_tau(x_i - v), `iters` times, from `reference` (the
  previous aggregate in the paper; zeros if None or not finite, as in ByzFL). tau=None picks tau
  as the median of ||x_i - reference|| (our choice: the paper tunes tau by hand; this keeps it
  scale free).
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
    "finite_rows",
    "geometric_median",
    "get_aggregator",
    "krum",
    "krum_scores",
    "mean",
    "multi_krum",
    "pairwise_sq_distances",
    "row_order",
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


def finite_rows(updates_NV: Tensor) -> tuple[Tensor, int]:
    """(the rows without NaN or inf, how many rows were dropped): the first step of every rule.

    A non-finite update is Byzantine whoever sent it. No copy when every row is finite."""
    n, _ = _check_updates(updates_NV)
    # A NaN or inf entry makes its row's sum NaN or inf, so one cheap reduction clears the usual
    # case; rows whose sum is not finite (or merely overflowed) are then checked entry by entry.
    suspect = ~torch.isfinite(updates_NV.sum(dim=1))
    if not bool(suspect.any()):
        return updates_NV, 0
    ok = ~suspect
    ok[suspect] = torch.isfinite(updates_NV[suspect]).all(dim=1)
    rejected = n - int(ok.sum())
    return (updates_NV, 0) if rejected == 0 else (updates_NV[ok], rejected)


def _finite(updates_NV: Tensor, f: int = 0) -> tuple[Tensor, int]:
    """The finite rows and the f left to tolerate among them (the dropped rows were Byzantine)."""
    kept, rejected = finite_rows(updates_NV)
    return kept, max(f - rejected, 0)


def _no_update(updates_NV: Tensor) -> Tensor:
    """What a rule returns when every row was rejected: zeros, i.e. the model does not move."""
    return updates_NV.new_zeros(updates_NV.shape[1])


def _pow2_scale(amax_N: Tensor) -> Tensor:
    """A power of two within a factor 2 below each value (1 for 0): dividing by it is exact."""
    _, exp = torch.frexp(amax_N)  # amax = m * 2^exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(amax_N), exp - 1)  # exp - 1: 2^128 overflows fp32


def _amax(x: Tensor) -> float:
    """max |x| (0 if empty), without an |x| temporary."""
    return max(float(x.amax()), -float(x.amin())) if x.numel() else 0.0


def _row_norms(x_NV: Tensor, bound: float) -> Tensor:
    """||x_i|| per row, given bound >= max |x|. Where the sum of squares could overflow, each row
    is first divided by a power of two near its largest entry, so a 1e19 fp32 row gets its finite
    norm, not inf; below that bound the plain norm runs (same bits as before)."""
    if bound * bound * x_NV.shape[1] < torch.finfo(x_NV.dtype).max / 4:
        return torch.linalg.vector_norm(x_NV, dim=1)
    scale = _pow2_scale(x_NV.abs().amax(dim=1))
    return torch.linalg.vector_norm(x_NV / scale[:, None], dim=1) * scale


def _gram64(
    updates_NV: Tensor, rows: list[int] | None = None, scale: Tensor | None = None
) -> Tensor:
    """G[a, b] = <y_a, y_b> in fp64 over chunks of V, y_a = x_rows[a] / scale[a] (rows default:
    all, in order; scale: fp64 per selected row, default 1)."""
    n = updates_NV.shape[0] if rows is None else len(rows)
    idx = None if rows is None else torch.tensor(rows, device=updates_NV.device)
    g = torch.zeros(n, n, dtype=torch.float64, device=updates_NV.device)
    for start in range(0, updates_NV.shape[1], _GRAM_CHUNK):
        cols = slice(start, start + _GRAM_CHUNK)
        blk = updates_NV[:, cols] if idx is None else updates_NV[idx, cols]  # gathered before fp64
        if scale is None:
            blk = blk.to(torch.float64)
        else:
            blk = blk.to(torch.float64, copy=True).div_(scale[:, None])  # never the input's memory
        g += blk @ blk.T
    return g


def gram64(updates_NV: Tensor) -> Tensor:
    """G[i, j] = <x_i, x_j> in fp64, accumulated over chunks of V (no full fp64 copy)."""
    _check_updates(updates_NV)
    return _gram64(updates_NV)


def _first_difference(x_NV: Tensor, idx: list[int], col: int) -> int | None:
    """The first column >= col where the rows idx do not all agree (None: they are equal)."""
    start, width = col, 1  # rows usually differ at once: read one column, then widen
    while start < x_NV.shape[1]:
        blk = x_NV[idx, start : start + width]
        differ = (blk != blk[:1]).any(dim=0).nonzero()
        if differ.numel():
            return start + int(differ[0])
        start, width = start + width, min(2 * width, _GRAM_CHUNK)
    return None


def row_order(updates_NV: Tensor) -> list[int]:
    """Row indices sorted by the rows' values, lexicographically (first coordinate first, -0 == 0).

    The tie-break of Krum, Multi-Krum and Bulyan: a function of the rows, not of their order.
    Equal rows keep their index order (they are interchangeable). Costs O(n) column reads unless
    rows share leading coordinates; equal rows (colluders) cost one pass over them.
    """
    n, _ = _check_updates(updates_NV)
    order: list[int] = []
    stack: list[tuple[list[int], int]] = [(list(range(n)), 0)]  # (rows equal before col, col)
    while stack:
        idx, col = stack.pop()
        c = _first_difference(updates_NV, idx, col) if len(idx) > 1 else None
        if c is None:
            order += idx
            continue
        groups: dict[float, list[int]] = {}
        for v, i in sorted(zip(updates_NV[idx, c].tolist(), idx)):
            groups.setdefault(v, []).append(i)
        stack += [(groups[v], c + 1) for v in sorted(groups, reverse=True)]  # smallest on top
    return order


def _sq_distances(updates_NV: Tensor, order: list[int]) -> Tensor:
    """pairwise_sq_distances computed with the rows in `order`, then put back in input order: the
    same rows in any order give the same distances, bit for bit."""
    g = _gram64(updates_NV, rows=order)
    sq = g.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * g).clamp_min_(0)
    # A Gram matrix from a matmul need not be bitwise symmetric; D must be, or two updates whose
    # nearest neighbour is each other get different Krum scores and a tie breaks by rounding.
    dist = (dist + dist.T) / 2
    dist.fill_diagonal_(0)
    dist = torch.where(torch.isfinite(dist), dist, torch.inf)  # fp64 overflow of a 1e300 row
    back = torch.empty(len(order), dtype=torch.long, device=dist.device)
    back[torch.tensor(order, device=dist.device)] = torch.arange(len(order), device=dist.device)
    return dist[back][:, back]


def pairwise_sq_distances(updates_NV: Tensor) -> Tensor:
    """D[i, j] = ||x_i - x_j||^2 (fp64, n x n, zero diagonal; non-finite entries become +inf)."""
    return _sq_distances(updates_NV, row_order(updates_NV))


def _by_score(scores: Tensor, rank: list[int]) -> list[int]:
    """Positions sorted by (score, the row's rank in row_order): ties never go by position."""
    s = scores.tolist()
    return sorted(range(len(s)), key=lambda i: (s[i], rank[i]))


def _ranks(order: list[int]) -> list[int]:
    rank = [0] * len(order)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


# -- rules ---------------------------------------------------------------------------------------
def mean(updates_NV: Tensor) -> Tensor:
    """Plain average of the finite rows: what data parallel computes, and what one Byzantine worker
    with a finite update can steer anywhere."""
    _check_updates(updates_NV)
    x, _ = finite_rows(updates_NV)
    return x.mean(dim=0) if x.shape[0] else _no_update(updates_NV)


def coordinate_median(updates_NV: Tensor) -> Tensor:
    """Per-coordinate median; for an even n the mean of the two middle values."""
    _check_updates(updates_NV)
    x, _ = finite_rows(updates_NV)
    n = x.shape[0]
    if n == 0:
        return _no_update(updates_NV)
    s = x.sort(dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(updates_NV: Tensor, f: int) -> Tensor:
    """Per coordinate, drop the f largest and f smallest values and average the n - 2f left."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("trimmed_mean", n, f)
    x, f = _finite(updates_NV, f)
    n = x.shape[0]
    if n == 0:
        return _no_update(updates_NV)
    if f == 0:
        return x.mean(dim=0)
    return x.sort(dim=0).values[f : n - f].mean(dim=0)


def krum_scores(sq_dist: Tensor, neighbours: int) -> Tensor:
    """Score_i = sum of the `neighbours` smallest squared distances from i to the others."""
    n = sq_dist.shape[0]
    _check_neighbours(n, neighbours)
    off = sq_dist.clone()
    off.fill_diagonal_(torch.inf)  # a vector is not its own neighbour
    return off.sort(dim=1).values[:, :neighbours].sum(dim=1)


def _check_neighbours(n: int, neighbours: int | None) -> None:
    if neighbours is not None and not 0 <= neighbours <= n - 1:
        raise ConfigError(f"krum needs 0 <= neighbours <= n - 1 = {n - 1}, got {neighbours}")


def _krum_neighbours(n: int, f: int, neighbours: int | None, slack: int = 2) -> int:
    """n - f - slack (slack 2: Blanchard et al.; 1: byzfl's convention), or the caller's count,
    within the n - 1 others of a row."""
    return max(n - f - slack, 0) if neighbours is None else min(neighbours, n - 1)


def _check_slack(slack: int) -> None:
    if slack not in (1, 2):
        raise ConfigError(
            f"krum's neighbour slack must be 1 (n - f - 1) or 2 (n - f - 2), got {slack}"
        )


def _krum_ranking(
    updates_NV: Tensor, f: int, neighbours: int | None, slack: int
) -> tuple[Tensor, list[int], list[int]] | None:
    """(the rows that count, each row's rank in row_order, row indices best Krum score first;
    ties by value), or None when no row is finite. Shared by Krum and Multi-Krum."""
    _check_neighbours(updates_NV.shape[0], neighbours)
    _check_slack(slack)
    x, f = _finite(updates_NV, f)
    if x.shape[0] == 0:
        return None
    order = row_order(x)
    rank = _ranks(order)
    k = _krum_neighbours(x.shape[0], f, neighbours, slack)
    return x, rank, _by_score(krum_scores(_sq_distances(x, order), k), rank)


def krum(updates_NV: Tensor, f: int, neighbours: int | None = None, slack: int = 2) -> Tensor:
    """The update whose n - f - slack nearest neighbours are closest (sum of squared distances);
    slack 2 is the paper's, 1 byzfl's (--krum-neighbours; docs/robust_and_coding.md)."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("krum", n, f)
    ranking = _krum_ranking(updates_NV, f, neighbours, slack)
    if ranking is None:
        return _no_update(updates_NV)
    x, _, best = ranking
    return x[best[0]].clone()


def multi_krum(
    updates_NV: Tensor, f: int, m: int | None = None, neighbours: int | None = None, slack: int = 2
) -> Tensor:
    """Average of the m updates with the best Krum scores (m defaults to n - f)."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("multi_krum", n, f)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ConfigError(f"multi_krum needs 1 <= m <= n = {n}, got m = {m}")
    ranking = _krum_ranking(updates_NV, f, neighbours, slack)
    if ranking is None:
        return _no_update(updates_NV)
    x, rank, best = ranking
    best = best[: min(m, x.shape[0])]  # n - f stays n - f after rejection
    return x[sorted(best, key=rank.__getitem__)].mean(dim=0)  # summed in row_order


def bulyan(updates_NV: Tensor, f: int) -> Tensor:
    """Krum-select theta = n - 2f updates, then average the beta = theta - 2f values closest to
    the coordinate-wise median of the selection."""
    n, _ = _check_updates(updates_NV)
    _check_f(f)
    check_tolerance("bulyan", n, f)
    x, f = _finite(updates_NV, f)
    n = x.shape[0]
    if n == 0:
        return _no_update(updates_NV)
    order = row_order(x)
    rank = _ranks(order)
    dist = _sq_distances(x, order)
    remaining = list(range(n))
    selected: list[int] = []
    for _ in range(n - 2 * f):
        sub = dist[remaining][:, remaining]
        # With f = 1 the last steps have zero neighbours: every score is 0, row_order decides.
        scores = krum_scores(sub, max(len(remaining) - f - 2, 0))
        best = _by_score(scores, [rank[i] for i in remaining])[0]
        selected.append(remaining.pop(best))
    s = x[selected].sort(dim=0).values  # per coordinate; the row order is gone
    theta, beta = s.shape[0], s.shape[0] - 2 * f
    med = s[theta // 2] if theta % 2 else (s[theta // 2 - 1] + s[theta // 2]) / 2
    # The beta values closest to med are a window [lo, hi] of the sorted column: drop the farther
    # end 2f times (equally far: the larger value goes, so the smaller of a tie stays).
    lo = torch.zeros(1, s.shape[1], dtype=torch.long, device=s.device)
    hi = torch.full_like(lo, theta - 1)
    for _ in range(2 * f):
        drop_hi = s.gather(0, hi) - med >= med - s.gather(0, lo)
        hi, lo = hi - drop_hi.long(), lo + (~drop_hi).long()
    rows = torch.arange(theta, device=s.device)[:, None]
    return torch.where((rows >= lo) & (rows <= hi), s, 0).sum(dim=0) / beta


def geometric_median(
    updates_NV: Tensor,
    nu: float = 1e-6,
    tol: float = 1e-7,
    max_iters: int = 100,
) -> Tensor:
    """Smoothed Weiszfeld iterations for argmin_z sum_i ||x_i - z||, started at zero.

    nu floors each distance (the smoothing of Pillutla et al.'s RFA), so a z that lands on a data
    point does not divide by zero.
    """
    _check_updates(updates_NV)
    if nu <= 0 or tol <= 0 or max_iters < 1:
        raise ConfigError("geometric_median needs nu > 0, tol > 0 and max_iters >= 1")
    x, _ = finite_rows(updates_NV)
    if x.shape[0] == 0:
        return _no_update(updates_NV)
    # From zero, as ByzFL: the first step is then the mean weighted by 1 / ||x_i||, which an absurd
    # row cannot drag away as it drags the plain mean. z stays in the box of the rows and zero
    # (each step averages the rows), so |x_i - z| <= 2 max |x|.
    bound = 2 * _amax(x)
    z = torch.zeros_like(x[0])
    for _ in range(max_iters):
        b = 1.0 / _row_norms(x - z, bound).clamp_min(nu)  # an overflowing norm: b = 0
        z_next = (b[:, None] * x).sum(dim=0) / b.sum()
        step = torch.linalg.vector_norm(z_next - z)
        z = z_next
        if step <= tol * max(float(torch.linalg.vector_norm(z)), nu):
            break
    return z


def _check_cc(tau: float | None, iters: int) -> None:
    if iters < 1:
        raise ConfigError(f"centered_clipping needs iters >= 1, got {iters}")
    if tau is not None and tau < 0:
        raise ConfigError(f"centered_clipping needs tau >= 0, got {tau}")


def _clip(x_NV: Tensor, tau: float | None, iters: int, reference: Tensor | None) -> Tensor:
    """centered_clipping on finite rows (at least one)."""
    n, d = x_NV.shape
    v = None if reference is None else reference.to(x_NV.device, x_NV.dtype).clone()
    if v is None or not bool(torch.isfinite(v).all()):
        v = torch.zeros(d, dtype=x_NV.dtype, device=x_NV.device)
    xmax = _amax(x_NV)  # with max |v|, bounds |x - v|
    if tau is None:
        dists = _row_norms(x_NV - v, xmax + _amax(v))
        tau = float(dists.sort().values[(n - 1) // 2])  # lower median: one of the distances
    for _ in range(iters):
        diff = x_NV - v
        norm = _row_norms(diff, xmax + _amax(v))
        scale = torch.where(norm > tau, tau / norm.clamp_min(torch.finfo(norm.dtype).tiny), 1.0)
        v = v + (diff * scale[:, None]).mean(dim=0)
    return v


def centered_clipping(
    updates_NV: Tensor,
    tau: float | None = None,
    iters: int = 1,
    reference: Tensor | None = None,
) -> Tensor:
    """v <- v + (1/n) sum_i clip_tau(x_i - v), `iters` times from v = reference (zeros if None).

    clip_tau(z) = z * min(1, tau / ||z||). tau=None: the median of ||x_i - reference||.
    """
    _check_updates(updates_NV)
    _check_cc(tau, iters)
    x, _ = finite_rows(updates_NV)
    return _clip(x, tau, iters, reference) if x.shape[0] else _no_update(updates_NV)


class CenteredClipping:
    """Stateful centered clipping, as the paper runs it: each call's reference is the previous
    call's output (zeros at first). Identical on every rank that sees the same inputs.

    A call whose every row is rejected (non-finite) returns zeros and keeps the reference."""

    def __init__(self, tau: float | None = None, iters: int = 1) -> None:
        _check_cc(tau, iters)
        self.tau, self.iters = tau, iters
        self.reference: Tensor | None = None

    def __call__(self, updates_NV: Tensor) -> Tensor:
        _check_updates(updates_NV)
        x, _ = finite_rows(updates_NV)
        if x.shape[0] == 0:
            return _no_update(updates_NV)
        out = _clip(x, self.tau, self.iters, self.reference)
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
