"""Question: how do DDP's tokens/s and bytes per step scale with the number of workers?

CPU (this 2-core machine, 1m preset):   python benchmarks/ddp_scaling.py --append
GPU machine (125m preset, 1/2/4 GPUs, plus 4 GPUs behind an emulated 1gbit:20ms link):
    python benchmarks/ddp_scaling.py --device cuda --model 125m --seq-len 1024 --batch-size 16 \
        --steps 60 --link-at-max 1gbit:20ms --link-steps 12 --append

Each configuration runs `lowband train` in a fresh process. Throughput is measured in steady state
(rank 0's metrics after the first 20% of steps, before the final evaluation and checkpoint).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, steady_state, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="1m")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--link-at-max", default=None, help="also run the largest worker count behind this link"
    )
    p.add_argument(
        "--link-steps", type=int, default=None, help="steps of the linked run (default: --steps)"
    )
    p.add_argument(
        "--append", action="store_true", help="append the table to benchmarks/RESULTS.md"
    )
    args = p.parse_args()

    counts = [int(x) for x in args.workers.split(",")]
    configs = [(n, None) for n in counts]
    if args.link_at_max:
        configs.append((max(counts), args.link_at_max))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, link in configs:
            flags = [
                "--workers", str(n), "--device", args.device, "--model", args.model,
                "--steps", str(args.link_steps or args.steps if link else args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                "--eval-every", str(args.steps), "--eval-batches", "2", "--log-every", "1", "--ckpt-every", "-1",
            ]  # fmt: skip
            if link:
                flags += ["--link", link]
            run = train(Path(tmp) / f"w{n}-{link or 'none'}", flags)
            s = steady_state(run)
            rows.append((n, link or "none", s))
            print(
                f"workers {n} link {link or 'none'}: {s['tokens_per_s']:,.0f} tok/s, "
                f"{s['step_time_s'] * 1e3:.1f} ms/step, {s['bytes_sent_per_step'] / 1e6:.2f} MB sent/step/worker, "
                f"comm {100 * s['comm_fraction']:.0f}% of wall",
                flush=True,
            )
    base = rows[0][2]["tokens_per_s"]
    table = (
        "| workers | link | tokens/s | vs 1 worker | ms/step | MB sent/step/worker | exposed comm (% wall) | eval loss |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    for n, link, s in rows:
        table += (
            f"| {n} | {link} | {s['tokens_per_s']:,.0f} | {s['tokens_per_s'] / base:.2f}x | {s['step_time_s'] * 1e3:.1f} | "
            f"{s['bytes_sent_per_step'] / 1e6:.2f} | {100 * s['comm_fraction']:.0f}% | {s['final_eval_loss']:.3f} |\n"
        )
    print(table)
    if args.append:
        append_results(
            f"DDP scaling, {args.model} on {args.device}",
            "python benchmarks/ddp_scaling.py " + shlex.join(sys.argv[1:]),
            table,
        )


if __name__ == "__main__":
    main()
