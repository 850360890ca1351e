"""Question: at equal tokens, what do DiLoCo and Streaming DiLoCo cost in loss, and save in bytes, against DDP?

CPU, 4 workers, default 1m model (issue 3, figure 1):
    python benchmarks/diloco_vs_ddp.py --steps 1000 --append
GPU, 125m preset, 4 GPUs, >= 40 outer steps at H=100 (figure 2), or under an emulated link (figure 3):
    python benchmarks/diloco_vs_ddp.py --device cuda --model 125m --seq-len 1024 --batch-size 8 --steps 4000 --append
    python benchmarks/diloco_vs_ddp.py --device cuda --model 125m --link 1gbit:50ms ... --append

Every configuration runs `lowband train` in a fresh process with the same model, data, seed,
workers and tokens. Bytes are per worker, as counted by lowband.comm (codec scales included).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, train  # noqa: E402

CONFIGS = {
    "ddp": [],
    "diloco-h10": ["--algo", "diloco", "--sync-every", "10"],
    "diloco-h25": ["--algo", "diloco", "--sync-every", "25"],
    "diloco-h50": ["--algo", "diloco", "--sync-every", "50"],
    "diloco-h100": ["--algo", "diloco", "--sync-every", "100"],
    "diloco-h100-4bit": ["--algo", "diloco", "--sync-every", "100", "--bits", "4"],
    "noloco-h50": ["--algo", "noloco", "--sync-every", "50"],
    "co2-h50": ["--algo", "co2", "--sync-every", "50"],
    "streaming-h100-p4-4bit": [
        "--algo", "streaming-diloco", "--sync-every", "100", "--fragments", "4", "--bits", "4",
    ],
}  # fmt: skip


def summarise(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    last = json.loads((run / "metrics" / "rank0.jsonl").read_text().splitlines()[-1])
    return {
        "eval_loss": s["final_eval_loss"],
        "bytes_per_worker": s["bytes_sent_per_worker"],
        "peak_sync_bytes": last.get("peak_sync_bytes"),
        "outer_steps": last.get("outer_step"),
        "compute_utilisation": s["compute_utilisation"],
        "exposed_comm": s["comm_time_per_worker"] / s["wall_time"],
        "wall_time": s["wall_time"],
        "tokens": s["tokens"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}"
    )
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="1m")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--link", default=None, help="emulated link, e.g. 1gbit:50ms")
    p.add_argument(
        "--overlap", type=int, default=None, help="Streaming DiLoCo tau (default: lowband's)"
    )
    p.add_argument("--extra", default="", help="extra flags for every run, e.g. '--lr 4e-4'")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--keep", default=None, help="keep the run folders here (for `lowband report`)")
    p.add_argument(
        "--append", action="store_true", help="append the table to benchmarks/RESULTS.md"
    )
    args = p.parse_args()

    names = args.configs.split(",")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for name in names:
            flags = [
                "--workers", str(args.workers), "--device", args.device, "--model", args.model,
                "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                "--eval-every", str(args.eval_every or max(1, args.steps // 10)), "--ckpt-every", "-1",
                *CONFIGS[name], *shlex.split(args.extra),
            ]  # fmt: skip
            if args.link:
                flags += ["--link", args.link]
            if args.overlap is not None and name.startswith("streaming"):
                flags += ["--overlap", str(args.overlap)]
            rows[name] = summarise(train(root / name, flags, timeout=7200))
            r = rows[name]
            print(
                f"{name}: eval {r['eval_loss']:.4f}, {r['bytes_per_worker'] / 1e6:.2f} MB/worker, "
                f"util {100 * r['compute_utilisation']:.1f}%, wall {r['wall_time']:.0f}s",
                flush=True,
            )
    ddp = rows.get("ddp")
    table = (
        "| config | eval loss | vs DDP | MB sent / worker | DDP bytes / these | outer steps | peak MB / sync "
        "| compute util. | exposed comm | wall s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for name, r in rows.items():
        vs = f"{100 * (r['eval_loss'] / ddp['eval_loss'] - 1):+.1f}%" if ddp else "–"
        ratio = (
            f"{ddp['bytes_per_worker'] / r['bytes_per_worker']:,.0f}x"
            if ddp and r["bytes_per_worker"]
            else "–"
        )
        peak = f"{r['peak_sync_bytes'] / 1e6:.3f}" if r["peak_sync_bytes"] else "–"
        table += (
            f"| {name} | {r['eval_loss']:.4f} | {vs} | {r['bytes_per_worker'] / 1e6:,.2f} | {ratio} | "
            f"{r['outer_steps'] if r['outer_steps'] is not None else '–'} | {peak} | "
            f"{100 * r['compute_utilisation']:.1f}% | {100 * r['exposed_comm']:.1f}% | {r['wall_time']:.0f} |\n"
        )
    print(table)
    if args.append:
        what = f"{args.model}, {args.workers} workers on {args.device}, {rows[names[0]]['tokens']:,} tokens"
        append_results(
            f"DiLoCo family vs DDP at equal tokens ({what}{', link ' + args.link if args.link else ''})",
            "python benchmarks/diloco_vs_ddp.py " + shlex.join(sys.argv[1:]),
            table,
        )


if __name__ == "__main__":
    main()
