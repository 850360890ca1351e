"""Federated rules on heterogeneous data: rounds and uplink bytes to reach FedAvg's final eval loss.

One question: on the stdlib corpus split by source (`--partition by-source`: each worker its own
packages) with half the clients drawn per round, how many rounds and uplink bytes does each rule
need to reach the eval loss FedAvg ends at, and where does it end?

    python benchmarks/federated.py                 # 4 workers, 1m model, 16 rounds of 10 steps
    python benchmarks/federated.py --workers 8 --rounds 30

Every run is `lowband train --algo A --partition by-source --participation 0.5 ...` in its own
process; the figures come from its metrics (eval loss at every round end, on the global held-out
documents every non-iid run shares, docs/federated.md; `uplink_bytes` per worker, summed over
workers: only participants that send count). Prints a Markdown table; the caller appends it to
benchmarks/RESULTS.md. Where SCAFFOLD runs (one or several `--variant "scaffold ..."` trials), a
column gives each run's uplink and final loss against the best of them: the issue's bar is
">= 10x fewer uplink bytes within 2% of SCAFFOLD's loss".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, train  # noqa: E402

ALGOS = [
    ("fedavg", []),
    ("fedprox", ["--mu", "0.01"]),
    ("scaffold", []),
    ("scallion", ["--compressor", "randk:0.05", "--cv-scale", "0.05", "--local-lr", "0.01"]),
    ("scallion", ["--compressor", "qsgd:8", "--local-lr", "0.1"]),
    ("scafcom", ["--compressor", "topk:0.05", "--local-lr", "0.1"]),
    ("admm-nr", ["--rho", "10", "--grad-estimate", "mean"]),
]


def read(run: Path, workers: int) -> list[dict]:
    """Per logged step: step, round, eval loss (rank 0) and uplink bytes summed over workers."""
    lines = {}
    for r in range(workers):
        for line in (run / "metrics" / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "step" in rec and "round" in rec:
                lines.setdefault(rec["step"], {})[r] = rec
    out = []
    for step in sorted(lines):
        recs = lines[step]
        if 0 in recs and "eval_loss" in recs[0] and len(recs) == workers:
            out.append(
                {
                    "step": step,
                    "round": recs[0]["round"],
                    "eval_loss": recs[0]["eval_loss"],
                    "uplink": sum(v["uplink_bytes"] for v in recs.values()),
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--model", default="1m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--out", default="runs/bench-federated")
    ap.add_argument("--algos", default=",".join(a for a, _ in ALGOS))
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'ALGO FLAGS'",
        help="run these instead of the default list, e.g. 'scallion --compressor qsgd:8'",
    )
    ap.add_argument("--target", type=float, help="the eval loss to reach (default: FedAvg's)")
    args = ap.parse_args()
    k, steps = args.local_steps, args.rounds * args.local_steps
    base = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    results = {}
    wanted = args.algos.split(",")
    runs = [(v.split()[0], v.split()[1:]) for v in args.variant] or ALGOS
    for i, (algo, extra) in enumerate(runs):
        if algo not in wanted:
            continue
        label = f"{algo} {' '.join(extra)}".strip()
        flags = ["--algo", algo, "--partition", "by-source", "--participation", "0.5",
                 "--workers", str(args.workers), "--model", args.model, "--steps", str(steps),
                 "--local-steps", str(k), "--batch-size", str(args.batch_size),
                 "--seq-len", str(args.seq_len), "--eval-every", str(k), "--log-every", str(k),
                 "--eval-batches", "4", "--ckpt-every", "-1", "--threads", "1", *extra]  # fmt: skip
        t0 = time.perf_counter()
        run = train(base / f"{i}-{algo}", flags)
        results[label] = (read(run, args.workers), time.perf_counter() - t0, extra)
        print(f"{label}: {results[label][0][-1]} ({results[label][1]:.0f} s)", flush=True)
    target = args.target
    if target is None and "fedavg" in results:
        target = results["fedavg"][0][-1]["eval_loss"]
    # the bar: >= 10x fewer uplink bytes than SCAFFOLD within 2% of its loss; the
    # reference is the best SCAFFOLD run of this invocation (all its trials are in the table)
    scaffolds = [(r[-1]["eval_loss"], r[-1]["uplink"]) for lab, (r, _, _) in results.items()
                 if lab.split(" ")[0] == "scaffold"]  # fmt: skip
    ref = min(scaffolds) if scaffolds else None
    print(f"\nmachine: {machine()}; target = FedAvg's final eval loss {target}")
    if ref:
        print(f"SCAFFOLD reference (best of {len(scaffolds)}): {ref[0]:.4f}, {ref[1] / 1e6:.1f} MB")
    print("| --algo | options | rounds to target | uplink MB to target | final eval loss "
          "| uplink MB total | vs best SCAFFOLD: uplink / loss | run s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, (rows, secs, extra) in results.items():
        algo = label.split(" ")[0]
        hit = next((r for r in rows if target is not None and r["eval_loss"] <= target), None)
        print(
            f"| {algo} | {' '.join(extra) or '-'} | {hit['round'] if hit else 'not reached'} | "
            f"{hit['uplink'] / 1e6:.1f} | "
            if hit
            else f"| {algo} | {' '.join(extra) or '-'} | not reached | - | ",
            end="",
        )
        loss, up = rows[-1]["eval_loss"], rows[-1]["uplink"]
        vs = f"{ref[1] / up:.1f}x fewer / {100 * (loss / ref[0] - 1):+.1f}%" if ref and up else "-"
        print(f"{loss:.4f} | {up / 1e6:.1f} | {vs} | {secs:.0f} |")


if __name__ == "__main__":
    main()
