"""How much Krum's neighbour count matters: n - f - 2 (the paper) vs n - f - 1 (byzfl).

Identical ALIE attackers (the worst case for a neighbour-sum score: f copies of one vector sit
at distance 0 from each other), f = 3 of n = 10, d = 1000, honest rows N(1, 1); over 20 seeds,
the relative error |out - honest mean| / |honest mean| of Krum and Multi-Krum under each
convention (`--krum-neighbours paper|byzfl`).

    python benchmarks/krum_neighbours.py [--append]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results  # noqa: E402

from lowband.robust import apply_attack, get_attack  # noqa: E402
from lowband.robust.aggregators import krum, multi_krum  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--f", type=int, default=3)
    p.add_argument("--d", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    n, f, d = args.n, args.f, args.d
    rules = {"krum": krum, "multi-krum": multi_krum}
    errors: dict[tuple[str, int], list[float]] = {(r, s): [] for r in rules for s in (2, 1)}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        honest = torch.randn(n, d, generator=g, dtype=torch.float64) + 1.0
        bad = list(range(n - f, n))
        x = apply_attack(honest, bad, get_attack("alie"), torch.Generator().manual_seed(seed))
        ref = honest[: n - f].mean(0)
        for (rule, slack), errs in errors.items():
            out = rules[rule](x, f, slack=slack)
            errs.append(float((out - ref).norm() / ref.norm()))
    lines = [
        "| rule | neighbours | mean relative error | max |",
        "|---|---|---|---|",
    ]
    for (rule, slack), errs in errors.items():
        which = "n - f - 2 (paper)" if slack == 2 else "n - f - 1 (byzfl)"
        lines.append(f"| {rule} | {which} | {sum(errs) / len(errs):.3f} | {max(errs):.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        append_results(
            f"Krum's neighbour count under identical ALIE attackers (f = {f} of n = {n}, d = {d}, "
            f"{args.seeds} seeds)",
            "python benchmarks/krum_neighbours.py --append",
            table,
        )


if __name__ == "__main__":
    main()
