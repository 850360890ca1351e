"""DADAO's per-edge gossip rates (docs/decentralized.md, *DADAO: rates*).

Edge (i, j) of an undirected graph gossips on its own Poisson clock of rate r_ij. With
b_ij = e_i - e_j and the rate-weighted Laplacian Lambda(r) = sum_ij r_ij b_ij b_ij^T (Nabli and
Oyallon, ICML 2023):

    chi1(r) = 1 / lambda_2(Lambda(r))                    (smallest positive eigenvalue)
    chi2(r) = (1/2) max_ij b_ij^T Lambda(r)^+ b_ij       (largest edge resistance, the authors'
                                                          1/2 convention)

DADAO's analysis asks for 2 chi1(r) chi2(r) <= 1 (the authors' run script sets the total rate to
sqrt(2 chi1 chi2) of uniform rates summing to 1, which meets it with equality). Both chi's scale as
1/c when r is scaled by c, so a direction p (sum p = 1) needs the total rate
`required_total(p) = sqrt(2 chi1(p) chi2(p))`, and the expected communications per unit of time
are that total. The rates that minimise communications are therefore

    minimise  sum_ij r_ij                                              (P)
    over      r >= 0
    s.t.      max_ij b_ij^T Lambda(r)^+ b_ij  <=  lambda_2(Lambda(r))     (2 chi1 chi2 <= 1)

(P) is an SDP, with one scalar s between the two sides:
    Lambda(r) - s (I - 11^T/n)  >= 0                           (lambda_2 >= s)
    [[Lambda(r) + 11^T/n, b_ij], [b_ij^T, s]]  >= 0  per edge  (Schur: resistance_ij <= s)
Resistance is convex in r and lambda_2 concave, so the feasible set is convex and (P) is exact,
not a relaxation; its optimum is the same direction as min_p chi1(p) chi2(p) on the simplex.
`sdp_rates` solves it with cvxpy (optional: `pip install 'lowband[decentral]'`), then recomputes
required_total of the solver's direction in fp64 and scales the rates to it, so the condition
holds exactly whatever the solver's tolerance.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from lowband.decentral.topology import Topology
from lowband.errors import ConfigError

KINDS = ("uniform", "resistance", "sdp")


def undirected_edges(topo: Topology) -> list[tuple[int, int]]:
    return sorted({(min(i, j), max(i, j)) for i, j in topo.edges()})


def laplacian(n: int, edges: list[tuple[int, int]], rates: list[float]) -> torch.Tensor:
    """sum over edges of rate (e_i - e_j)(e_i - e_j)^T, fp64."""
    lap = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), r in zip(edges, rates):
        lap[i, i] += r
        lap[j, j] += r
        lap[i, j] -= r
        lap[j, i] -= r
    return lap


def chi1(lap: torch.Tensor) -> float:
    """1 / the smallest positive eigenvalue (the graph is connected: the second one)."""
    return float(1.0 / torch.linalg.eigvalsh(lap)[1])


def resistances(lap: torch.Tensor, edges: list[tuple[int, int]]) -> list[float]:
    """(1/2)(e_i - e_j)^T lap^+ (e_i - e_j) per edge (the authors' chi_2 convention)."""
    pinv = torch.linalg.pinv(lap)
    return [0.5 * float(pinv[i, i] + pinv[j, j] - 2 * pinv[i, j]) for i, j in edges]


def chi_product(n: int, edges: list[tuple[int, int]], rates: list[float]) -> float:
    """chi1 chi2 of the rates' direction (normalised to sum 1): the quantity the SDP minimises."""
    total = sum(rates)
    lap = laplacian(n, edges, [r / total for r in rates])
    return chi1(lap) * max(resistances(lap, edges))


def required_total(n: int, edges: list[tuple[int, int]], rates: list[float]) -> float:
    """The smallest total rate in the rates' direction with 2 chi1 chi2 <= 1."""
    return math.sqrt(2 * chi_product(n, edges, rates))


def gossip_rates(topo: Topology, kind: str = "uniform", total: float | None = None) -> list[float]:
    """Per-edge rates over `undirected_edges(topo)`. `total` (default: the kind's own
    `required_total`; uniform's is the authors' sqrt(2 chi1 chi2)) fixes their sum.

    uniform: the same rate on every edge. resistance: proportional to each edge's effective
    resistance in the unweighted graph (a heuristic: bridges get more). sdp: the optimum of (P)."""
    edges = undirected_edges(topo)
    if not edges:
        raise ConfigError(f"--topology {topo.name}: DADAO needs at least one edge")
    if kind == "uniform":
        direction = [1.0] * len(edges)
    elif kind == "resistance":
        direction = resistances(laplacian(topo.n, edges, [1.0] * len(edges)), edges)
    elif kind == "sdp":
        direction = list(sdp_direction(topo.n, tuple(edges)))
    else:
        raise ConfigError(f"unknown --gossip-rates {kind!r}; choose {', '.join(KINDS)}")
    if total is None:
        total = required_total(topo.n, edges, direction)
    if not (total > 0 and math.isfinite(total)):
        raise ConfigError(f"the total gossip rate must be a positive number, got {total}")
    s = sum(direction)
    return [total * d / s for d in direction]


@functools.cache
def sdp_direction(n: int, edges: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """The solution of (P) (module docstring), negatives from the solver's tolerance set to 0."""
    try:
        import cvxpy as cp
    except ImportError:
        raise ConfigError(
            "--gossip-rates sdp needs cvxpy: pip install 'lowband[decentral]' (or use uniform or "
            "resistance)"
        ) from None
    import numpy as np

    m = len(edges)
    B = np.zeros((n, m))
    for k, (i, j) in enumerate(edges):
        B[i, k], B[j, k] = 1.0, -1.0
    J = np.full((n, n), 1.0 / n)
    r, s = cp.Variable(m, nonneg=True), cp.Variable()
    lap = B @ cp.diag(r) @ B.T
    lap = (lap + lap.T) / 2  # symmetric by construction; tell cvxpy so
    constraints = [lap - s * (np.eye(n) - J) >> 0]
    for k in range(m):
        b = B[:, k : k + 1]
        block = cp.bmat([[lap + J, b], [b.T, cp.reshape(s, (1, 1), order="C")]])
        constraints.append((block + block.T) / 2 >> 0)
    problem = cp.Problem(cp.Minimize(cp.sum(r)), constraints)
    solver = cp.CLARABEL if cp.CLARABEL in cp.installed_solvers() else cp.SCS
    try:
        with (
            warnings.catch_warnings()
        ):  # "may be inaccurate": the fp64 rescale below makes it exact
            warnings.simplefilter("ignore")
            problem.solve(solver=solver)
    except cp.error.SolverError as e:
        raise ConfigError(f"--gossip-rates sdp: the solver failed ({e})") from None
    if problem.status not in ("optimal", "optimal_inaccurate") or r.value is None:
        raise ConfigError(f"--gossip-rates sdp: the solver ended {problem.status}")
    rates = np.maximum(r.value, 0.0)
    rates[rates < 1e-9 * rates.max()] = 0.0  # the solver's zeros
    if not connected_by(n, edges, rates):  # cannot happen for an optimum; a solver slip would
        raise ConfigError("--gossip-rates sdp: the solver's rates leave the graph disconnected")
    return tuple(float(x) for x in rates)


def connected_by(n: int, edges, rates) -> bool:
    """The edges with a positive rate connect all n nodes."""
    seen, todo = {0}, [0]
    adj: dict[int, list[int]] = {i: [] for i in range(n)}
    for (i, j), r in zip(edges, rates):
        if r > 0:
            adj[i].append(j)
            adj[j].append(i)
    while todo:
        for j in adj[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == n


__all__ = [
    "KINDS",
    "chi1",
    "chi_product",
    "gossip_rates",
    "laplacian",
    "required_total",
    "resistances",
    "sdp_direction",
    "undirected_edges",
]
