"""Smooth strongly convex problems split over n workers, and the synchronous baseline DADAO is
measured against (docs/decentralized.md, *DADAO*). Everything fp64 and a pure function of the seed.

Heterogeneous data: worker i's samples are drawn around its own model w_i = (i, i, ..., i) (ridge)
or labelled by it (logistic), so the local optima differ and plain local training does not solve
the global problem f = sum_i f_i.

  ridge:     f_i(x) = (1/m) ||A_i x - b_i||^2 + (reg/2) ||x||^2,  b_i = A_i w_i + 0.1 noise
  logistic:  f_i(x) = (1/m) sum_k log(1 + exp(-y_ik <a_ik, x>)) + (reg/2) ||x||^2,
             y_ik = sign(<a_ik, w_i - mean_j w_j> + 0.5 noise)

`condition` K spreads the feature scales (column c of every A_i is multiplied by
K^(-c / (2 (d - 1)))), so the data Hessian's spread, and L/mu, grows about as K.

`gradient_tracking` is DIGing (Nedic, Olshevsky and Shi 2017), the synchronous reference:
    X <- W X - a Y;  Y <- W Y + G(X_new) - G(X_old),  Y_0 = G(X_0),
one exchange of x and one of y with every neighbour per iteration (2 vectors each way per edge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowband.errors import ConfigError

KINDS = ("ridge", "logistic")


@dataclass
class Problem:
    name: str
    n: int
    dim: int
    grad: Callable[[int, torch.Tensor], torch.Tensor]
    """grad(i, x) = grad f_i(x), fp64."""
    mu: float
    """Every f_i is mu-strongly convex..."""
    L: float
    """... and L-smooth."""
    x_star: torch.Tensor
    """The minimiser of sum_i f_i."""

    def error(self, X: torch.Tensor) -> float:
        """mean_i ||x_i - x*||^2 / ||x*||^2 (X: n x dim): the precision DADAO's runs report."""
        return float((X - self.x_star).square().sum(1).mean() / self.x_star.square().sum())


def make_problem(
    kind: str,
    n: int,
    dim: int = 4,
    samples: int = 12,
    reg: float = 0.5,
    condition: float = 1.0,
    seed: int = 0,
) -> Problem:
    """The problem of the module docstring; ConfigError (one line) on bad input."""
    if kind not in KINDS:
        raise ConfigError(f"unknown --problem {kind!r}; choose {', '.join(KINDS)}")
    if n < 2 or dim < 1 or samples < 1 or not reg > 0 or not condition >= 1:
        raise ConfigError(
            f"--problem {kind}: needs at least 2 workers, dim >= 1, samples >= 1, reg > 0 and "
            f"condition >= 1 (got {n}, {dim}, {samples}, {reg}, {condition})"
        )
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor(
        [condition ** (-c / (2 * max(dim - 1, 1))) for c in range(dim)], dtype=torch.float64
    )
    A = [torch.randn(samples, dim, generator=g, dtype=torch.float64) * scale for _ in range(n)]
    eye = torch.eye(dim, dtype=torch.float64)
    if kind == "ridge":
        H, c = [], []
        for i in range(n):
            b = A[i] @ torch.full((dim,), float(i), dtype=torch.float64)
            b = b + 0.1 * torch.randn(samples, generator=g, dtype=torch.float64)
            H.append(2 / samples * A[i].T @ A[i] + reg * eye)
            c.append(2 / samples * A[i].T @ b)
        mu = min(float(torch.linalg.eigvalsh(h)[0]) for h in H)
        L = max(float(torch.linalg.eigvalsh(h)[-1]) for h in H)
        return Problem(
            kind, n, dim, lambda i, x: H[i] @ x - c[i], mu, L, torch.linalg.solve(sum(H), sum(c))
        )
    centre = (n - 1) / 2
    y = []
    for i in range(n):
        w = torch.full((dim,), float(i) - centre, dtype=torch.float64)
        noise = 0.5 * torch.randn(samples, generator=g, dtype=torch.float64)
        y.append(torch.where(A[i] @ w + noise >= 0, 1.0, -1.0).to(torch.float64))

    def grad(i: int, x: torch.Tensor) -> torch.Tensor:
        z = y[i] * (A[i] @ x)
        return -(A[i].T @ (y[i] * torch.sigmoid(-z))) / samples + reg * x

    L = max(float(torch.linalg.eigvalsh(a.T @ a)[-1]) / (4 * samples) for a in A) + reg
    x = torch.zeros(dim, dtype=torch.float64)
    for _ in range(100):  # Newton on sum_i f_i: quadratic convergence from 0 (strongly convex)
        total = sum(grad(i, x) for i in range(n))
        hess = n * reg * eye
        for i in range(n):
            s = torch.sigmoid(y[i] * (A[i] @ x))
            hess = hess + A[i].T @ (A[i] * (s * (1 - s))[:, None]) / samples
        step = torch.linalg.solve(hess, total)
        x = x - step
        if float(step.norm()) < 1e-15 * max(1.0, float(x.norm())):
            break
    return Problem(kind, n, dim, grad, reg, L, x)


def gradient_tracking(
    problem: Problem,
    W: torch.Tensor,
    step: float,
    precision: float,
    max_iters: int = 100_000,
) -> int | None:
    """DIGing iterations (module docstring) from X = 0 until `problem.error(X) < precision`;
    None if it diverges or does not get there within max_iters."""
    n, d = problem.n, problem.dim
    X = torch.zeros(n, d, dtype=torch.float64)
    G = torch.stack([problem.grad(i, X[i]) for i in range(n)])
    Y = G.clone()
    for k in range(1, max_iters + 1):
        X_new = W @ X - step * Y
        G_new = torch.stack([problem.grad(i, X_new[i]) for i in range(n)])
        Y = W @ Y + G_new - G
        X, G = X_new, G_new
        if not torch.isfinite(X).all():
            return None
        if problem.error(X) < precision:
            return k
    return None


__all__ = ["KINDS", "Problem", "gradient_tracking", "make_problem"]
