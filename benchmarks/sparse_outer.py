"""Bytes and loss of SparseLoCo's sparse 2-bit outer gradients against DiLoCo, Streaming DiLoCo and DDP.

All runs at equal tokens (same steps, batch and workers; no emulated link: bytes and loss only).
DDP's bytes come from a short DDP run of the same model and workers (bytes per step are fixed)
times the steps; the others run the whole budget. Every byte counts: values, indices, scales,
the start check.

    python benchmarks/sparse_outer.py --append
    python benchmarks/sparse_outer.py --parallel 4 --sync-every 48 --only sweep --json sweep.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
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


def sweep(h: int) -> dict[str, list[str]]:
    """#14's sweep toward >= 3,000x fewer bytes than DDP at a loss no worse than fp32 DiLoCo at
    the same H: DiLoCo fp32 at its outer lr 0.7 and 1.0 as the reference; SparseLoCo over the outer
    lr (the paper tunes it; the reference code's mean over the workers that sent a value makes
    its steps up to R x ours, so lrs up to 4 = R are in range), the error decay beta, the fraction
    and the chunk layout (flat runs vs the paper's per-tensor 64 x 64 tiles). Names start with
    "sweep:"; choose with --only, and --steps 3000 for the longer runs."""
    H = str(h)
    rows = {
        "sweep: DiLoCo fp32, outer lr 0.7": ["--algo", "diloco", "--sync-every", H],
        "sweep: DiLoCo fp32, outer lr 1.0": [
            "--algo", "diloco", "--sync-every", H, "--outer-lr", "1.0",
        ],
    }  # fmt: skip
    grid = [  # (fraction, layout, outer lr, decay); 1.5% is ~3,690x fewer bytes than DDP at 1m
        *[(f, lay, lr, "0.95") for f in ("0.01", "0.015") for lay in ("flat", "tiles")
          for lr in ("1.5", "2.0", "3.0", "4.0")],
        *[("0.01", "tiles", lr, d) for lr in ("2.0", "3.0") for d in ("0.9", "0.99")],
        *[(f, "tiles", "6.0", "0.95") for f in ("0.01", "0.015")],  # lr kept helping to 4
        *[(f, "flat", "4.0", "0.95") for f in ("0.03",)],  # a third fraction at the best lr
    ]  # fmt: skip
    for fraction, layout, lr, decay in grid:
        name = f"sweep: SparseLoCo {float(fraction) * 100:g}% 2-bit {layout}, outer lr {lr}, decay {decay}"
        rows[name] = [
            "--algo", "diloco", "--sync-every", H, "--compress", f"topk:{fraction}:2:{layout}",
            "--outer-lr", lr, "--error-decay", decay,
        ]  # fmt: skip
    # the reference code's mean over the workers that sent each coordinate (--sparse-mean
    # senders): rarely sent coordinates land whole, so the best lr should be lower than 4
    for fraction, lr in [
        ("0.015", "0.7"),
        ("0.015", "1.0"),
        ("0.015", "2.0"),
        ("0.015", "3.0"),
        ("0.01", "2.0"),
    ]:
        name = f"sweep: SparseLoCo {float(fraction) * 100:g}% 2-bit flat, outer lr {lr}, decay 0.95, senders mean"
        rows[name] = [
            "--algo", "diloco", "--sync-every", H, "--compress", f"topk:{fraction}:2:flat",
            "--outer-lr", lr, "--error-decay", "0.95", "--sparse-mean", "senders",
        ]  # fmt: skip
    # DiLoCo's outer lr above 1 (its tuning budget) and eager at lower outer lrs
    rows["sweep: DiLoCo fp32, outer lr 1.5"] = [
        "--algo",
        "diloco",
        "--sync-every",
        H,
        "--outer-lr",
        "1.5",
    ]
    for lr in ("0.3", "0.5"):
        rows[f"sweep: eager DiLoCo fp32, outer lr {lr}"] = [
            "--algo", "diloco", "--sync-every", H, "--outer-lr", lr, "--outer", "eager",
        ]  # fmt: skip
    for lr in ("1.0", "2.0"):
        rows[f"sweep: eager SparseLoCo 1.5% 2-bit flat, outer lr {lr}, decay 0.95"] = [
            "--algo", "diloco", "--sync-every", H, "--compress", "topk:0.015:2:flat",
            "--outer-lr", lr, "--error-decay", "0.95", "--outer", "eager",
        ]  # fmt: skip
    # eager against blocking at the best blocking settings (1.5% flat, lr 4) and DiLoCo's
    for name in ("sweep: SparseLoCo 1.5% 2-bit flat, outer lr 4.0, decay 0.95",
                 "sweep: DiLoCo fp32, outer lr 1.0"):  # fmt: skip
        rows[name.replace("sweep: ", "sweep: eager ")] = [*rows[name], "--outer", "eager"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="1m")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument(
        "--only",
        default="",
        help="config names to run, separated by ';' (default: the first table's; 'sweep': all the "
        "'sweep:' ones)",
    )
    p.add_argument("--parallel", type=int, default=1, help="runs at once (on a machine with cores)")
    p.add_argument(
        "--device",
        default="auto",
        help="lowband train's --device (cuda: the workers share the GPUs)",
    )
    p.add_argument(
        "--seeds",
        default="0",
        help="model and data seeds, separated by ','; every chosen row runs once per seed (rows of "
        "seeds other than 0 are named '..., seed N')",
    )
    p.add_argument(
        "--timeout", type=float, default=7200, help="seconds one run may take (default 2 h)"
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    common = ["--model", args.model, "--workers", str(args.workers), "--ckpt-every", "-1",
              "--eval-every", str(args.steps // 4), "--log-every", "50", "--device", args.device]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ddp = train(Path(tmp) / "ddp", [*common, "--steps", "20", "--eval-every", "20"])
        per_step = json.loads((ddp / "summary.json").read_text())["bytes_sent_per_worker"] / 20
        ddp_bytes = per_step * args.steps
        every = {**configs(args.sync_every), **sweep(args.sync_every)}
        wanted = args.only.split(";") if args.only else [n for n in every if "sweep:" not in n]
        if args.only == "sweep":
            wanted = [n for n in every if n.startswith("sweep:")]
        unknown = [n for n in wanted if n not in every]
        if unknown:
            p.error(f"unknown config(s) {unknown}; known: {list(every)}")
        seeds = [int(x) for x in args.seeds.split(",")]
        chosen = {
            name + (f", seed {seed}" if seed else ""): [*every[name], "--seed", str(seed)]
            for name in wanted
            for seed in seeds
        }

        def one(item):
            name, flags = item
            out = Path(tmp) / "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
            start = time.monotonic()
            run = train(out, [*common, "--steps", str(args.steps), *flags], timeout=args.timeout)
            return run, time.monotonic() - start

        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            futures = {pool.submit(one, item): item[0] for item in chosen.items()}
            for future in concurrent.futures.as_completed(futures):  # each row kept as it lands
                run, wall = future.result()
                s = json.loads((run / "summary.json").read_text())
                rows.append(
                    {
                        "name": futures[future],
                        "bytes": s["bytes_sent_per_worker"],
                        "x_fewer_than_ddp": ddp_bytes / s["bytes_sent_per_worker"],
                        "eval_loss": s["final_eval_loss"],
                        "wall_s": round(wall, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                if args.json:
                    args.json.write_text(
                        json.dumps({"ddp_bytes": ddp_bytes, "rows": rows}, indent=1)
                    )
        rows.sort(key=lambda r: list(chosen).index(r["name"]))
    lines = [
        "| method | bytes sent per worker | fewer than DDP | final eval loss | run s |",
        "|---|---|---|---|---|",
        f"| DDP (bytes: 20 measured steps x {args.steps}) | {ddp_bytes:,.0f} | 1x | - | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['bytes']:,.0f} | {r['x_fewer_than_ddp']:,.0f}x "
            f"| {r['eval_loss']:.4f} | {r['wall_s']:.0f} |"
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
