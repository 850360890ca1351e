"""Gradient codes (Tandon, Lei, Dimakis, Karampatziakis, ICML 2017): finish a round without the
s slowest workers and still recover the exact full gradient.

The data is cut into n parts with gradients g_0..g_{n-1}; the full gradient is sum_j g_j. Worker i
computes the gradients of the parts in the support of row i of B (n x n, s + 1 parts each) and
sends one vector f_i = sum_j B[i, j] g_j. A code tolerates s stragglers when, for every set I of
n - s survivors, the all-ones vector lies in the row span of B_I: some a with a^T B_I = 1, and
then sum_{i in I} a_i f_i = sum_j g_j.

    fractional_repetition(n, s)   (s + 1) | n. Workers in groups of s + 1; group k owns parts
                                  k(s+1) .. k(s+1) + s and each member sends their plain sum
                                  (B entries are 0/1). Decode: the first arrival of every group,
                                  a_i in {0, 1}, exact in any precision. s stragglers cannot
                                  silence a group of s + 1.
    cyclic_mds(n, s, seed)        any s < n. Row i is supported on parts i, i+1, .., i+s (mod n).
                                  H is a random s x n Gaussian matrix with H 1 = 0 (last column
                                  minus the sum of the others); row i is 1 at part i and solves
                                  H B_i^T = 0 on the other s parts. The rows then lie in null(H),
                                  a space of dimension n - s that contains 1, and any n - s of them
                                  are independent with probability 1, so they span it. This is the
                                  construction of Tandon et al.'s Algorithm 2, as their reference
                                  code builds it (getB). Decode: least squares in fp64.

Random H makes B_I's conditioning a draw: tests/test_coding.py checks the decode of every subset
of survivors for the (n, s) it covers to 1e-9. For larger n, check `worst_decode_residual` before
relying on a seed (it enumerates every subset, C(n, s) of them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowband.errors import ConfigError

__all__ = [
    "CODES",
    "GradientCode",
    "cyclic_mds",
    "decode_coefficients",
    "fractional_repetition",
    "get_code",
    "worst_decode_residual",
]

_DECODE_TOL = 1e-8  # max |a^T B_I - 1| accepted by decode_coefficients (fp64)


def _check_ns(n: int, s: int) -> None:
    for name, v in (("n", n), ("s", s)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"gradient coding needs an integer {name}, got {v!r}")
    if n < 1:
        raise ConfigError(f"gradient coding needs n >= 1 workers, got n = {n}")
    if not 0 <= s < n:
        raise ConfigError(
            f"gradient coding tolerates 0 <= s <= n - 1 stragglers, got s = {s} with n = {n}"
        )


def decode_coefficients(B: Tensor, survivors: Sequence[int], tol: float = _DECODE_TOL) -> Tensor:
    """a (length n, zero off the survivors) with sum_i a_i B[i] = 1, by fp64 least squares.

    Raises ValueError when 1 is not in the span of the survivors' rows (too many stragglers).
    """
    n = B.shape[0]
    idx = sorted(set(int(i) for i in survivors))
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"survivors must be a non-empty subset of 0..{n - 1}, got {survivors}")
    b_i = B[idx].to(torch.float64)
    ones = torch.ones(B.shape[1], 1, dtype=torch.float64)
    # gelsd (SVD based) handles rank-deficient B_I; the CPU default gelsy would too, but fp64
    # SVD keeps the residual check below meaningful.
    a_i = torch.linalg.lstsq(b_i.T, ones, driver="gelsd").solution[:, 0]
    residual = float((b_i.T @ a_i - 1).abs().max())
    if not residual <= tol:
        raise ValueError(
            f"cannot decode from survivors {idx}: 1 is not in their rows' span "
            f"(residual {residual:.2e})"
        )
    a = torch.zeros(n, dtype=torch.float64)
    a[idx] = a_i
    return a


@dataclass(frozen=True)
class GradientCode:
    """An (n, s) gradient code: B, which parts each worker computes, and how to decode."""

    name: str
    n: int
    """Workers, and data parts."""
    s: int
    """Stragglers tolerated."""
    B: Tensor
    """(n, n) fp64 encoding matrix: worker i sends sum_j B[i, j] g_j."""
    supports: tuple[tuple[int, ...], ...]
    """supports[i]: the s + 1 parts worker i computes (row i's support, by construction)."""
    groups: tuple[tuple[int, ...], ...] | None = None
    """Fractional repetition only: the workers of each group (they share the group's parts)."""

    def parts(self, worker: int) -> tuple[int, ...]:
        """The data parts worker computes gradients for: the support of row `worker`."""
        return self.supports[worker]

    @property
    def assignment(self) -> tuple[tuple[int, ...], ...]:
        """parts(i) for every worker i."""
        return self.supports

    def encode(self, worker: int, partial_grads: Mapping[int, Tensor]) -> Tensor:
        """f_worker = sum_j B[worker, j] g_j from this worker's part gradients {part: g_j}."""
        parts = self.parts(worker)
        missing = set(parts) - set(partial_grads)
        if missing:
            raise ValueError(f"worker {worker} needs the gradients of parts {sorted(missing)}")
        out = None
        for j in parts:
            term = partial_grads[j] * float(self.B[worker, j])
            out = term if out is None else out.add_(term)
        return out

    def decode_coefficients(self, survivors: Sequence[int]) -> Tensor:
        """a with sum_i a_i B[i] = 1 using only `survivors` (in arrival order).

        Fractional repetition takes the first survivor listed in every group (a_i = 1); the
        cyclic code solves least squares in fp64.
        """
        if self.groups is None:
            return decode_coefficients(self.B, survivors)
        a = torch.zeros(self.n, dtype=torch.float64)
        arrived = list(dict.fromkeys(int(i) for i in survivors))
        for group in self.groups:
            first = next((i for i in arrived if i in group), None)
            if first is None:
                raise ValueError(f"cannot decode: no worker of group {group} arrived")
            a[first] = 1.0
        return a

    def decode(self, coded: Mapping[int, Tensor]) -> Tensor:
        """sum_j g_j from the survivors' messages {worker: f_worker} (dict order = arrival).

        Accumulates in fp64 and returns the messages' dtype.
        """
        a = self.decode_coefficients(list(coded))
        first = next(iter(coded.values()))
        out = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for i, f_i in coded.items():
            if a[i] != 0:
                out += float(a[i]) * f_i.to(torch.float64)
        return out.to(first.dtype)


def fractional_repetition(n: int, s: int) -> GradientCode:
    """Groups of s + 1 workers share s + 1 parts; needs (s + 1) | n."""
    _check_ns(n, s)
    if n % (s + 1):
        raise ConfigError(
            f"fractional repetition needs s + 1 to divide n: got n = {n}, s = {s} "
            f"(use cyclic_mds, or n a multiple of {s + 1})"
        )
    size = s + 1
    B = torch.zeros(n, n, dtype=torch.float64)
    groups = []
    for k in range(n // size):
        members = tuple(range(k * size, (k + 1) * size))
        B[k * size : (k + 1) * size, k * size : (k + 1) * size] = 1.0
        groups.append(members)
    supports = tuple(groups[i // size] for i in range(n))  # a group's parts = its members' ids
    return GradientCode("fractional_repetition", n, s, B, supports, tuple(groups))


def cyclic_mds(n: int, s: int, seed: int = 0) -> GradientCode:
    """Row i supported on parts i..i+s (mod n), all rows in null(H) for a random H with H 1 = 0."""
    _check_ns(n, s)
    if s == 0:
        return GradientCode(
            "cyclic_mds", n, 0, torch.eye(n, dtype=torch.float64), tuple((i,) for i in range(n))
        )
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(s, n - 1, generator=gen, dtype=torch.float64)
    h = torch.cat([h, -h.sum(dim=1, keepdim=True)], dim=1)  # H 1 = 0
    B = torch.zeros(n, n, dtype=torch.float64)
    supports = tuple(tuple((i + k) % n for k in range(s + 1)) for i in range(n))
    for i, support in enumerate(supports):
        support = list(support)
        B[i, support[0]] = 1.0
        # H[:, rest] b = -H[:, first]: then H B_i^T = 0.
        B[i, support[1:]] = torch.linalg.solve(h[:, support[1:]], -h[:, support[0]])
    return GradientCode("cyclic_mds", n, s, B, supports)


def worst_decode_residual(code: GradientCode, limit: int = 20_000) -> float:
    """max over every set of n - s survivors of max |a^T B_I - 1| (fp64); refuses > limit sets."""
    count = math.comb(code.n, code.s)
    if count > limit:
        raise ValueError(f"{count} survivor sets exceed limit={limit}")
    worst = 0.0
    for stragglers in itertools.combinations(range(code.n), code.s):
        survivors = [i for i in range(code.n) if i not in stragglers]
        a = decode_coefficients(code.B, survivors, tol=math.inf)
        worst = max(worst, float((a @ code.B - 1).abs().max()))
    return worst


CODES = {"fractional_repetition": fractional_repetition, "cyclic_mds": cyclic_mds}
_ALIASES = {"fr": "fractional_repetition", "cyclic": "cyclic_mds", "mds": "cyclic_mds"}


def get_code(name: str, n: int, s: int, seed: int = 0) -> GradientCode:
    """A code by name ("fractional_repetition"/"fr", "cyclic_mds"/"cyclic"); ConfigError else."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key == "fractional_repetition":
        return fractional_repetition(n, s)
    if key == "cyclic_mds":
        return cyclic_mds(n, s, seed)
    raise ConfigError(f"unknown gradient code {name!r}: expected one of {', '.join(CODES)}")
