"""Flag Aggregator (Almasi et al., arXiv 2302.05865): a robust subspace of the workers' directions.

The update rule, as the authors' code gives it (hamidralmasi/FlagAggregator,
aggregators/flag_median.py and center_algorithms_torch.py, FlagIRLS for the flag median):

    x_i = g_i / ||g_i||                                    unit directions (zero stays zero)
    Y (V x r) orthonormal
    repeat:  w_i = (|1 - ||Y^T x_i||^2| + eps)^(-1/4)       eps = 1e-7
             [lambda > 0: a column x_i - x_j for every ordered pair i != j, weighted
              (|1 - ||Y^T (x_i - x_j)||^2| + eps)^(-1/4) * lambda / (n (n - 1))]
             Y <- top-r left singular vectors of [w_i x_i, ...]
             until the objective sum_i sqrt(max(0, 1 - ||Y^T x_i||^2)) stops decreasing
    reference output: (1/r) sum_i Y Y^T x_i

A worker whose direction is far from the others' subspace gets a small weight, so Y follows the
majority; the output is every direction projected onto Y.

What we do differently, and why:
- Norms. The reference output has no gradient scale: it is a sum of unit vectors, about n/r times
  a unit direction. We return  median_i ||g_i|| * (1/n) sum_i Y Y^T x_i : the mean projected
  direction times the median norm, so unanimous workers (all g_i = g) get exactly g back, and no
  minority, however large its norms, sets the scale. `rescale=False` returns the reference formula.
- Computation. Y always lies in the span of the x_i, so we never form V x r matrices in the loop.
  One fp64 Gram matrix K = X^T X = V diag(sig^2) V^T (O(n^2 V)) gives X = U_x diag(sig) V^T. The
  weighted columns are X M for an n x m coefficient matrix M, and only A = M M^T (n x n) matters:
  (X M)(X M)^T = U_x T U_x^T with T = diag(sig) V^T A V diag(sig), so Y = U_x Q = X C with Q the
  top-r eigenvectors of T and C = V diag(1/sig) Q. The lambda term's n(n-1) columns x_i - x_j add
  twice the Laplacian of their squared weights to A. Every iteration is O(n^3) whatever V is; one
  final O(nV) product forms the output.
- Start. The reference starts from a random Y (seed 1) and runs 4 iterations. We start from the
  flag mean (all weights 1), which is what a random start's first iteration gives up to O(1/V)
  terms, and is deterministic, so every rank computes the same Y without a shared seed.

Non-finite and absurd updates: flag_aggregator drops rows with NaN or inf first (finite_rows;
zeros if none is left). Where a sum of squares could overflow fp64, the Gram matrix is built from
each row divided by a power of two near its largest entry, so a 1e300 row does not overflow into
inf * 0 = NaN, which made eigh fail to converge and crash every rank. The division is exact.

Not robust to everything: the rule is sign blind (x and -x span the same line), so an attack along
the honest direction (sign flip, IPM) keeps a full weight and only its norm is bounded, exactly as
for the mean of normalized updates. See docs/robust_and_coding.md for measurements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowband.errors import ConfigError
from lowband.robust.aggregators import _check_updates, _gram64, _no_update, _pow2_scale, finite_rows

__all__ = ["flag_aggregator", "flag_subspace"]

_EPS = 1e-7  # the reference's weight perturbation


def _whiten(k: Tensor) -> tuple[Tensor, Tensor]:
    """K = V diag(sig^2) V^T restricted to K's range: X = U_x diag(sig) V^T with U_x = X V / sig."""
    evals, v = torch.linalg.eigh(k)
    keep = evals > evals[-1].clamp_min(0) * 1e-12
    return v[:, keep], evals[keep].sqrt()


def _top_r(v: Tensor, sig: Tensor, a: Tensor, r: int) -> Tensor:
    """C such that X C holds the top-r left singular vectors of the columns X M, given
    a = M M^T (n x n): (X M)(X M)^T = U_x T U_x^T with T = diag(sig) V^T a V diag(sig)."""
    t = sig[:, None] * (v.T @ a @ v) * sig[None, :]
    e, q = torch.linalg.eigh(t)
    e, q = e.flip(0)[:r], q.flip(1)[:, :r]
    q = q[:, e > e[0].clamp_min(0) * 1e-12] if e.numel() else q  # directions X M does not have
    return v @ (q / sig[:, None])  # Y = U_x q = X V diag(1/sig) q


def _objective(k: Tensor, c: Tensor) -> Tensor:
    """sum_i sqrt(max(0, 1 - ||Y^T x_i||^2)) over unit (non-zero) x_i."""
    proj = c.T @ k  # (r, n): Y^T x_i
    nonzero = k.diagonal() > 0
    return (1 - proj.square().sum(0)).clamp_min(0).sqrt()[nonzero].sum()


def _weights(k: Tensor, c: Tensor, lam: float) -> Tensor:
    """a = M diag(w^2) M^T for the weighted columns of one IRLS step (n x n)."""
    n = k.shape[0]
    proj = c.T @ k  # (r, n)
    w = ((1 - proj.square().sum(0)).abs() + _EPS).pow(-0.25)
    a = torch.diag(w.square())
    if lam > 0 and n > 1:
        # Columns x_i - x_j (ordered pairs): Y^T (x_i - x_j) = proj_i - proj_j. Their weighted
        # outer products sum to twice the Laplacian of the pair weights squared.
        diff = proj[:, :, None] - proj[:, None, :]  # (r, n, n)
        wp = ((1 - diff.square().sum(0)).abs() + _EPS).pow(-0.25) * (lam / (n * (n - 1)))
        wp2 = wp.square().fill_diagonal_(0)
        a = a + 2 * (torch.diag(wp2.sum(1)) - wp2)
    return a


def _check_options(r: int, lam: float, iters: int) -> None:
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"flag_aggregator needs an integer r >= 1, got {r!r}")
    if lam < 0 or iters < 1:
        raise ConfigError("flag_aggregator needs lam >= 0 and iters >= 1")


def flag_subspace(
    updates_NV: Tensor, r: int = 1, lam: float = 0.0, iters: int = 10, tol: float = 1e-10
) -> tuple[Tensor, Tensor, Tensor]:
    """FlagIRLS in the span of the updates. Returns (C, K, norms): Y = X C with X the unit
    directions as columns, K = X^T X, norms = ||g_i||; all fp64, all n x n work."""
    n, d = _check_updates(updates_NV)
    _check_options(r, lam, iters)
    # Where a sum of squares could overflow fp64 (a 1e300 row), row i is divided by s_i, a power
    # of two near its largest entry: exact, so K (cosines) is the same as from the raw rows.
    scale = None
    if d:
        amax = torch.maximum(updates_NV.amax(dim=1), -updates_NV.amin(dim=1)).to(torch.float64)
        big = float(amax.max())
        if big * big * d >= torch.finfo(torch.float64).max / 4:
            scale = _pow2_scale(amax)
    g = _gram64(updates_NV, scale=scale)
    unit = g.diagonal().clamp_min(0).sqrt()  # ||g_i|| / s_i
    inv = torch.where(unit > 0, 1 / unit, torch.zeros_like(unit))
    k = g * inv[:, None] * inv[None, :]
    norms = unit if scale is None else unit * scale  # inf only beyond fp64: its 1 / norm is 0
    v, sig = _whiten(k)
    if sig.numel() == 0:  # every update is zero
        return k.new_zeros(n, 0), k, norms

    c = _top_r(v, sig, torch.eye(n, dtype=k.dtype, device=k.device), r)  # flag mean start
    best_c, best_err = c, _objective(k, c)
    for _ in range(iters):
        c = _top_r(v, sig, _weights(k, c, lam), r)
        err = _objective(k, c)
        if not bool(err < best_err - tol):  # the reference stops once it no longer decreases
            if bool(err < best_err):
                best_c, best_err = c, err
            break
        best_c, best_err = c, err
    return best_c, k, norms


def flag_aggregator(
    updates_NV: Tensor,
    r: int = 1,
    lam: float = 0.0,
    iters: int = 10,
    rescale: bool = True,
) -> Tensor:
    """Flag median of the update directions, projected back (module docstring).

    r: subspace dimension (the paper uses 1, 4, 8; at most n). lam: weight of the pairwise term.
    rescale: True returns median_i ||g_i|| * (1/n) sum_i Y Y^T x_i; False the reference's
    (1/r) sum_i Y Y^T x_i. Rows with NaN or inf are dropped first (zeros if none is left).
    """
    _check_updates(updates_NV)
    _check_options(r, lam, iters)
    x, _ = finite_rows(updates_NV)
    n = x.shape[0]
    if n == 0:
        return _no_update(updates_NV)
    c, k, norms = flag_subspace(x, r, lam, iters)
    inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
    # sum_i Y Y^T x_i = X C C^T K 1, and X = G diag(inv) with G the raw updates as columns.
    if c.shape[1] == 0:
        return _no_update(updates_NV)
    coeff = c @ (c.T @ k.sum(dim=1))  # (n,) in the x basis
    if rescale:
        coeff = coeff * (norms.quantile(0.5) / n)  # mean of the two middle norms for even n
    else:
        coeff = coeff / r
    coeff = (coeff * inv).to(x.dtype)
    return coeff @ x
