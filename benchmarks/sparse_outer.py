"""Bytes and loss of SparseLoCo's sparse 2-bit outer gradients against DiLoCo, Streaming DiLoCo and DDP.

All runs at equal tokens (same steps, batch and workers; no emulated link: bytes and loss only).
DDP's bytes come from a short DDP run of the same model and workers (bytes per step are fixed)
times the steps; the others run the whole budget. Every byte counts: values, indices, scales,
the start check.

    python benchmarks/sparse_outer.py --append
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_results, train  # noqa: E402


def configs(h: int) -> dict[str, list[str]]:
    H = str(h)
    return {
        "DiLoCo fp32": ["--algo", "diloco", "--sync-every", H],
        "Streaming DiLoCo 4-bit (P=4)": [
            "--algo", "streaming-diloco", "--sync-every", H, "--fragments", "4", "--overlap", "1",
            "--bits", "4",
        ],
        "SparseLoCo 3% 2-bit": ["--algo", "diloco", "--sync-every", H, "--compress", "topk:0.03:2"],
        "SparseLoCo 1% 2-bit": ["--algo", "diloco", "--sync-every", H, "--compress", "topk:0.01:2"],
        # the sweep (outer lr, eager) and DiLoCo at the same outer lr for fairness
        "DiLoCo fp32, outer lr 1.0": ["--algo", "diloco", "--sync-every", H, "--outer-lr", "1.0"],
        "SparseLoCo 1% 2-bit, outer lr 1.5": [
            "--algo", "diloco", "--sync-every", H, "--compress", "topk:0.01:2", "--outer-lr", "1.5",
        ],
        "SparseLoCo 1% 2-bit, outer lr 2.0": [
            "--algo", "diloco", "--sync-every", H, "--compress", "topk:0.01:2", "--outer-lr", "2.0",
        ],
        "SparseLoCo 2% 2-bit, outer lr 1.5": [
            "--algo", "diloco", "--sync-every", H, "--compress", "topk:0.02:2", "--outer-lr", "1.5",
        ],
        "SparseLoCo 1% 2-bit eager, outer lr 1.0": [
            "--algo", "diloco", "--sync-every", H, "--compress", "topk:0.01:2", "--outer-lr", "1.0",
            "--outer", "eager",
        ],
        "SparseLoCo 1% 2-bit, decay 0.9, outer lr 1.5": [
            "--algo", "diloco", "--sync-every", H, "--compress", "topk:0.01:2", "--outer-lr", "1.5",
            "--error-decay", "0.9",
        ],
        "Streaming SparseLoCo 1% 2-bit (P=4)": [
            "--algo", "streaming-diloco", "--sync-every", H, "--fragments", "4", "--overlap", "1",
            "--compress", "topk:0.01:2",
        ],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="1m")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument("--only", default="", help="config names to run, separated by ';'")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (on a machine with cores)")
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    common = ["--model", args.model, "--workers", str(args.workers), "--ckpt-every", "-1",
              "--eval-every", str(args.steps // 4), "--log-every", "50"]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ddp = train(Path(tmp) / "ddp", [*common, "--steps", "20", "--eval-every", "20"])
        per_step = json.loads((ddp / "summary.json").read_text())["bytes_sent_per_worker"] / 20
        ddp_bytes = per_step * args.steps
        chosen = {
            name: flags
            for name, flags in configs(args.sync_every).items()
            if not args.only or name in args.only.split(";")
        }

        def one(item):
            name, flags = item
            out = Path(tmp) / name.replace(" ", "_")
            return train(out, [*common, "--steps", str(args.steps), *flags])

        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            runs = list(pool.map(one, chosen.items()))
        for name, run in zip(chosen, runs, strict=True):
            s = json.loads((run / "summary.json").read_text())
            rows.append(
                {
                    "name": name,
                    "bytes": s["bytes_sent_per_worker"],
                    "x_fewer_than_ddp": ddp_bytes / s["bytes_sent_per_worker"],
                    "eval_loss": s["final_eval_loss"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"ddp_bytes": ddp_bytes, "rows": rows}, indent=1))
    lines = [
        "| method | bytes sent per worker | fewer than DDP | final eval loss |",
        "|---|---|---|---|",
        f"| DDP (bytes: 20 measured steps x {args.steps}) | {ddp_bytes:,.0f} | 1x | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['bytes']:,.0f} | {r['x_fewer_than_ddp']:,.0f}x | {r['eval_loss']:.4f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results(
            f"SparseLoCo vs DiLoCo vs Streaming DiLoCo: bytes and loss ({args.model}, "
            f"{args.workers} workers, {args.steps} steps, H={args.sync_every})",
            "python " + " ".join(sys.argv),
            text,
        )


if __name__ == "__main__":
    main()
