"""Graphs and mixing matrices for decentralized training (docs/decentralized.md).

`parse_topology(spec, n, seed)` turns `--topology ring|torus|exponential|complete|erdos:P|FILE.json`
into a `Topology`: the edge list and the mixing matrix W (fp64, `W[i, j]` the weight node i gives
to node j's model; Metropolis-Hastings weights unless a file gives its own), checked connected and
doubly stochastic (ConfigError, one line, otherwise), with its spectral gap
`1 - ||W - 11^T/n||_2`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowband.errors import ConfigError

KINDS = ("ring", "torus", "exponential", "complete")
TOL = 1e-9


@dataclass
class Topology:
    """A graph over nodes 0..n-1 and its mixing matrix."""

    name: str
    n: int
    W: torch.Tensor
    """n x n fp64; row i: the weights node i applies to its own and its in-neighbours' models."""
    directed: bool = False
    spectral_gap: float = field(init=False)

    def __post_init__(self) -> None:
        self.spectral_gap = spectral_gap(self.W)

    def in_neighbours(self, i: int) -> list[int]:
        """The nodes whose models node i receives (ascending)."""
        return [j for j in range(self.n) if j != i and self.W[i, j] > 0]

    def out_neighbours(self, i: int) -> list[int]:
        """The nodes that receive node i's model (ascending)."""
        return [j for j in range(self.n) if j != i and self.W[j, i] > 0]

    def edges(self) -> list[tuple[int, int]]:
        """Directed edges (j, i): j's model goes to i; both directions for an undirected graph."""
        return [(j, i) for i in range(self.n) for j in self.in_neighbours(i)]

    def describe(self) -> dict:
        """What the `topology` event records."""
        return {
            "topology": self.name,
            "nodes": self.n,
            "directed": self.directed,
            "edges": [list(e) for e in self.edges()],
            "spectral_gap": self.spectral_gap,
            "mixing": self.W.tolist(),
        }


def spectral_gap(W: torch.Tensor) -> float:
    """1 - ||W - 11^T/n||_2; for a symmetric W, 1 - max(|lambda_2|, |lambda_n|)."""
    n = W.shape[0]
    if n == 1:
        return 1.0
    J = torch.full_like(W, 1.0 / n)
    return float(1.0 - torch.linalg.matrix_norm(W - J, ord=2))


def metropolis(n: int, edges: set[tuple[int, int]]) -> torch.Tensor:
    """Metropolis-Hastings weights of an undirected graph (edges as (i, j), i < j)."""
    deg = [0] * n
    for i, j in edges:
        deg[i] += 1
        deg[j] += 1
    W = torch.zeros(n, n, dtype=torch.float64)
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (1 + max(deg[i], deg[j]))
    W += torch.diag(1.0 - W.sum(1))
    return W


def _undirected(pairs) -> set[tuple[int, int]]:
    return {(min(i, j), max(i, j)) for i, j in pairs if i != j}


def ring_edges(n: int) -> set[tuple[int, int]]:
    return _undirected((i, (i + 1) % n) for i in range(n))


def torus_edges(n: int) -> set[tuple[int, int]]:
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    c = n // r
    if r == 1:
        return ring_edges(n)
    pairs = []
    for a in range(r):
        for b in range(c):
            i = a * c + b
            pairs += [(i, a * c + (b + 1) % c), (i, ((a + 1) % r) * c + b)]
    return _undirected(pairs)


def exponential_edges(n: int) -> set[tuple[int, int]]:
    pairs, k = [], 1
    while k < n:
        pairs += [(i, (i + k) % n) for i in range(n)]
        k *= 2
    return _undirected(pairs)


def complete_edges(n: int) -> set[tuple[int, int]]:
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


def erdos_edges(n: int, p: float, seed: int, tries: int = 100) -> set[tuple[int, int]]:
    """G(n, p), redrawn from one seeded stream until connected (at most `tries` draws)."""
    rng = random.Random(f"erdos:{seed}:{n}:{p}")
    for _ in range(tries):
        edges = {(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p}
        if _connected(n, edges, directed=False):
            return edges
    raise ConfigError(
        f"--topology erdos:{p} on {n} workers gave no connected graph in {tries} draws; raise P "
        f"(connectivity needs P above about ln(n)/n = {math.log(max(n, 2)) / n:.2f})"
    )


def _connected(n: int, edges, directed: bool) -> bool:
    """Connected (undirected) or strongly connected (directed: edge (i, j) is i -> j)."""
    if n <= 1:
        return True

    def reach(adj) -> int:
        seen, todo = {0}, [0]
        while todo:
            for j in adj[todo.pop()]:
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return len(seen)

    fwd: list[list[int]] = [[] for _ in range(n)]
    bwd: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        fwd[i].append(j)
        bwd[j].append(i)
        if not directed:
            fwd[j].append(i)
            bwd[i].append(j)
    return reach(fwd) == n and reach(bwd) == n


def check_mixing(W: torch.Tensor, name: str) -> None:
    """ConfigError unless W is non-negative, doubly stochastic and its graph connected."""
    n = W.shape[0]
    if W.shape != (n, n) or not torch.isfinite(W).all():
        raise ConfigError(f"--topology {name}: the mixing matrix must be a finite {n}x{n} matrix")
    if (W < 0).any():
        raise ConfigError(f"--topology {name}: the mixing matrix has negative weights")
    rows, cols = W.sum(1), W.sum(0)
    if (rows - 1).abs().max() > TOL or (cols - 1).abs().max() > TOL:
        bad = "row" if (rows - 1).abs().max() > TOL else "column"
        raise ConfigError(
            f"--topology {name}: the mixing matrix is not doubly stochastic (a {bad} sums to "
            f"{float(rows[(rows - 1).abs().argmax()] if bad == 'row' else cols[(cols - 1).abs().argmax()]):.6g}, not 1)"
        )
    edges = [(j, i) for i in range(n) for j in range(n) if i != j and W[i, j] > 0]
    if not _connected(n, edges, directed=True):
        raise ConfigError(f"--topology {name}: the graph is not connected on {n} workers")


def parse_topology(spec: str, n: int, seed: int = 0) -> Topology:
    """The Topology of `spec` over n nodes (module docstring); ConfigError, one line, if invalid."""
    check_spec(spec)
    if n < 1:
        raise ConfigError(f"--topology {spec}: needs at least one worker, got {n}")
    if spec.endswith(".json"):
        return _from_file(spec, n)
    if spec.startswith("erdos:"):
        edges = erdos_edges(n, float(spec.split(":", 1)[1]), seed)
    else:
        edges = {
            "ring": ring_edges,
            "torus": torus_edges,
            "exponential": exponential_edges,
            "complete": complete_edges,
        }[spec](n)
    W = metropolis(n, edges)
    check_mixing(W, spec)
    return Topology(spec, n, W)


def check_spec(spec: str) -> None:
    """The spec's syntax (and a file's existence), without knowing n: for Options checks."""
    if spec in KINDS:
        return
    if spec.startswith("erdos:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            p = float("nan")
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"--topology {spec}: P must be a number in (0, 1]")
        return
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise ConfigError(f"--topology {spec}: no such file")
        return
    raise ConfigError(
        f"unknown --topology {spec!r}; choose ring, torus, exponential, complete, erdos:P or a "
        "FILE.json"
    )


def _from_file(path: str, n: int) -> Topology:
    try:
        spec = json.loads(Path(path).read_text())
        nodes = int(spec.get("nodes", n))
        directed = bool(spec.get("directed", False))
        pairs = [(int(i), int(j)) for i, j in spec["edges"]]
        weights = spec.get("weights")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            f'--topology {path}: expected {{"nodes": N, "edges": [[i, j], ...], '
            f'"directed": false, "weights": [[...]]}} ({type(e).__name__}: {e})'
        ) from None
    if nodes != n:
        raise ConfigError(f"--topology {path}: the file has {nodes} nodes, the run {n} workers")
    if any(not (0 <= i < n and 0 <= j < n) for i, j in pairs):
        raise ConfigError(f"--topology {path}: an edge names a node outside 0..{n - 1}")
    if weights is None:
        if directed:
            raise ConfigError(
                f'--topology {path}: a directed graph needs its doubly stochastic "weights"'
            )
        W = metropolis(n, _undirected(pairs))
    else:
        try:
            W = torch.tensor(weights, dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise ConfigError(f'--topology {path}: bad "weights" ({e})') from None
        if W.shape != (n, n):
            raise ConfigError(f'--topology {path}: "weights" must be {n}x{n}')
        allowed = (
            {(j, i) for i, j in pairs}
            if directed
            else {e for i, j in pairs for e in ((i, j), (j, i))}
        )
        for i in range(n):
            for j in range(n):
                if i != j and W[i, j] > 0 and (i, j) not in allowed:
                    raise ConfigError(
                        f"--topology {path}: weight W[{i}][{j}] > 0 but {j} -> {i} is not an edge"
                    )
    check_mixing(W, path)
    return Topology(path, n, W, directed=directed)


__all__ = ["Topology", "check_mixing", "check_spec", "metropolis", "parse_topology", "spectral_gap"]
