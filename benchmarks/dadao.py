"""Does DADAO reach precision 1e-6 with fewer communications than synchronous gradient tracking,
and do the SDP gossip rates beat uniform ones? (docs/decentralized.md, *DADAO*; issue #16.)

Each DADAO row is a real `lowband dadao` run: 8 processes, one per node, point-to-point messages
on the graph's edges only (Gloo, 127.0.0.1, no emulated link: the counts do not depend on it).
Distributed ridge (or, `--problem logistic`, logistic) regression with heterogeneous data, x0 = 0; precision is
mean_i ||x_i - x*||^2 / ||x*||^2 < 1e-6, read off every node's x recorded every 0.5 time units.
Reported: gradients and edge activations (one d-vector each way on one edge) until then, the
time, and the linear rate (slope of log error over the second half of the run, per time unit).

Baseline: DIGing (gradient tracking, lowband.decentral.problems.gradient_tracking, fp64,
Metropolis W), at the best step of a grid (its best case): 2 edge activations per edge per
iteration (x and the tracker y), n gradients per iteration. D-PSGD without tracking does not
reach 1e-6 here at any constant step (the heterogeneity bias; tests/test_dadao.py).

    python benchmarks/dadao.py                      # L/mu ~ 7 and ~ 217, ring and erdos:0.4
    python benchmarks/dadao.py --problem logistic --settings 0.01:1

`--straggler RANK:SECONDS` asks another question instead: does one slow node slow the others?
Rendezvous against mailbox runtime (`lowband dadao --runtime`), on a real-time clock (`--pace`),
with and without node RANK sleeping SECONDS per gradient; wall time of its neighbours, of the
others and of itself, gradients it lost, and the final error.

    python benchmarks/dadao.py --straggler 3:0.02 --graphs ring --time 200 --pace 0.005
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import train  # noqa: E402

from lowband.decentral import parse_topology  # noqa: E402
from lowband.decentral.problems import gradient_tracking, make_problem  # noqa: E402
from lowband.decentral.rates import undirected_edges  # noqa: E402

STEPS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def dadao_row(root: Path, kind: str, spec: str, rates: str, n: int, reg: float, cond: float,
              t: float):  # fmt: skip
    flags = ["--problem", kind, "--workers", str(n), "--topology", spec, "--gossip-rates", rates, "--time", f"{t:g}",
             "--reg", str(reg), "--condition", str(cond), "--record-every", "0.5"]  # fmt: skip
    name = f"{kind}-{spec}-{rates}-{reg:g}-{cond:g}".replace(":", "")
    run = train(root / name, flags, command="dadao")
    summary = json.loads((run / "summary.json").read_text())
    graph = json.loads((run / "graph.json").read_text())
    trace = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    half = [r for r in trace if r["t"] >= t / 2 and r["error"] > 0]
    slope = (math.log(half[-1]["error"]) - math.log(half[0]["error"])) / (
        half[-1]["t"] - half[0]["t"]
    )
    return {
        "method": f"DADAO, {rates} rates (total {graph['total_rate']:.2f})",
        "hit": summary["reached"],
        "rate": slope,
        "dropped": summary["dropped_edges"],
        "wall": max(summary["seconds_per_node"]),
    }


def tracking_row(kind: str, spec: str, n: int, reg: float, cond: float, precision: float):
    problem = make_problem(kind, n, reg=reg, condition=cond)
    topo = parse_topology(spec, n, seed=0)
    best = None
    for a in STEPS:
        k = gradient_tracking(problem, topo.W, a / problem.L, precision)
        if k is not None and (best is None or k < best[0]):
            best = (k, a)
    if best is None:
        return {"method": "gradient tracking (DIGing)", "hit": None}
    k, a = best
    m = len(undirected_edges(topo))
    return {
        "method": f"gradient tracking (DIGing, step {a}/L)",
        "hit": {"gradients": n * k, "edge_activations": 2 * m * k, "t": k},
    }


def straggler_rows(root: Path, args) -> None:
    """The --straggler question (module docstring): one run per runtime, with and without it."""
    rank = int(args.straggler.split(":")[0])
    spec = args.graphs.split(",")[0]
    topo = parse_topology(spec, args.workers, seed=0)
    near = {j for e in undirected_edges(topo) if rank in e for j in e} - {rank}
    print(f"| runtime | slow node | wall s: neighbours of {rank} | others | node {rank} "
          f"| gradients lost by {rank} | final error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for slow in (None, args.straggler):
        for runtime in ("rendezvous", "mailbox"):
            flags = ["--problem", args.problem, "--workers", str(args.workers), "--topology", spec,
                     "--time", f"{args.time:g}", "--pace", f"{args.pace:g}", "--runtime", runtime,
                     "--record-every", "1"] + (["--straggler", slow] if slow else [])  # fmt: skip
            run = train(root / f"{runtime}-{bool(slow)}", flags, command="dadao")
            s = json.loads((run / "summary.json").read_text())
            node = json.loads((run / "nodes" / f"rank{rank}.json").read_text())
            secs = s["seconds_per_node"]
            others = [secs[r] for r in range(args.workers) if r != rank and r not in near]
            print(f"| {runtime} | {slow or 'none'} | {max(secs[r] for r in near):.2f} | "
                  f"{max(others):.2f} | {secs[rank]:.2f} | {node['gradients_skipped']} | "
                  f"{s['final_error']:.3g} |", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="ridge", help="ridge or logistic")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--graphs", default="ring,erdos:0.4")
    p.add_argument("--settings", default="0.5:1,0.01:100", help="REG:CONDITION pairs")
    p.add_argument("--rates", default="uniform,sdp")
    p.add_argument("--out", default=None)
    p.add_argument("--straggler", help="RANK:SECONDS: the slow-node question instead")
    p.add_argument("--time", type=float, default=200.0, help="with --straggler: Poisson time")
    p.add_argument("--pace", type=float, default=0.005, help="with --straggler: s per time unit")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(args.out or tempfile.mkdtemp(prefix="dadao-bench-"))
    if args.straggler:
        straggler_rows(root, args)
        print("command: python benchmarks/dadao.py " + shlex.join(sys.argv[1:]))
        return
    print("| L/mu | graph | method | gradients | edge activations | time (DADAO) / iterations "
          "| linear rate (log error per time unit) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        reg, cond = (float(x) for x in setting.split(":"))
        problem = make_problem(args.problem, args.workers, reg=reg, condition=cond)
        kappa = problem.L / problem.mu
        horizon = 90 * math.sqrt(kappa)  # ~1.5x the time to 1e-6 seen at kappa ~ 7
        for spec in args.graphs.split(","):
            rows = [dadao_row(root, args.problem, spec, r, args.workers, reg, cond, horizon)
                    for r in args.rates.split(",")]  # fmt: skip
            rows.append(tracking_row(args.problem, spec, args.workers, reg, cond, 1e-6))
            for row in rows:
                hit = row["hit"]
                cells = (
                    [f"{hit['gradients']:,}", f"{hit['edge_activations']:,}", f"{hit['t']:g}"]
                    if hit
                    else ["not reached", "", ""]
                )
                rate = f"{row['rate']:.4f}" if "rate" in row else "-"
                print(f"| {kappa:.1f} | {spec} | {row['method']} | {' | '.join(cells)} | {rate} |",
                      flush=True)  # fmt: skip
                if row.get("dropped"):
                    print(f"  (dropped edges: {row['dropped']})")
    print("command: python benchmarks/dadao.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
