"""The fair study (#14): DDP, DiLoCo, Streaming DiLoCo and SparseLoCo at equal tokens, each with the
same trial budget, best trial per method reported with every trial listed.

Every method gets the same number of trials: the peak (inner) learning rate times each of
`--lr-mults` (the one knob every method has, and the one the presets guess); the other knobs stay
at each method's published defaults (DiLoCo / Streaming DiLoCo: outer Nesterov lr 0.7, momentum
0.9; Streaming P=4, tau=1, 4-bit; SparseLoCo: outer SGD lr `--sparse-outer-lr`, 1.0 as in its
paper, error decay 0.95, 2-bit values). All runs: the same model, tokens, per-worker batch,
schedule, seed and held-out split.

DDP is run as one process with the global batch (`--workers 1 --batch-size WORKERS x B`): the same
update as WORKERS data-parallel workers averaging their gradients (mean loss over the global
batch; gradients clipped after averaging, as `lowband train --algo ddp` does), without shipping
125M gradients through host copies between processes that share one GPU every step. Its bytes are
the exact count `lowband plan` predicts for WORKERS workers (tests/test_plan.py checks that
count against real runs). The other methods run as WORKERS processes sharing the GPUs
(`--device cuda`), as a user would run them.

Results go to `--json` after every trial, so a run cut short keeps what it finished.

    python benchmarks/fair_study.py --device cuda --model 125m --tokens 20000000 --json out.json
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
from lowband.config import DEFAULT_LR  # noqa: E402


def methods(args) -> dict[str, list[str]]:
    H = str(args.sync_every)
    return {
        "DDP": ["--algo", "ddp"],
        "DiLoCo fp32": ["--algo", "diloco", "--sync-every", H],
        "Streaming DiLoCo 4-bit": [
            "--algo", "streaming-diloco", "--sync-every", H, "--fragments", "4", "--overlap", "1",
            "--bits", "4",
        ],
        f"SparseLoCo {args.sparse}": [
            "--algo", "diloco", "--sync-every", H, "--compress", args.sparse,
            "--outer-lr", str(args.sparse_outer_lr),
        ],
        f"SparseLoCo {args.sparse} eager": [
            "--algo", "diloco", "--sync-every", H, "--compress", args.sparse,
            "--outer-lr", str(args.sparse_outer_lr), "--outer", "eager",
        ],
    }  # fmt: skip


def ddp_bytes(args, steps: int) -> int:
    """Bytes each of args.workers DDP workers sends over `steps` steps (lowband.plan's exact count)."""
    from lowband.models import build_model
    from lowband.plan.cost import Technique, Workload, predict

    model = build_model(args.model, device="meta")
    w = Workload(
        params=model.num_params(), layers=0, dim=0, batch_size=args.batch_size,
        seq_len=args.seq_len, tokens=args.tokens, tokens_per_s=1.0, model=model,
    )  # fmt: skip
    return int(predict(w, Technique("ddp"), args.workers, None).bytes_per_step * steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="125m")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=float, default=20e6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sync-every", type=int, default=32, help="H (a multiple of 4)")
    p.add_argument("--lr-mults", default="0.5,1,2")
    p.add_argument("--sparse", default="topk:0.02:2")
    p.add_argument("--sparse-outer-lr", type=float, default=1.0)
    p.add_argument("--methods", default="", help="comma-separated method names (default: all)")
    p.add_argument("--parallel", type=int, default=1, help="trials at once")
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    base_lr = DEFAULT_LR[args.model]
    mults = [float(x) for x in args.lr_mults.split(",")]
    chosen = {
        k: v for k, v in methods(args).items() if not args.methods or k in args.methods.split(",")
    }
    global_tokens_per_step = args.workers * args.batch_size * args.seq_len
    steps = int(args.tokens) // global_tokens_per_step
    common = [
        "--model", args.model, "--device", args.device, "--steps", str(steps),
        "--seq-len", str(args.seq_len), "--ckpt-every", "-1", "--eval-every", str(steps),
        "--eval-batches", str(args.eval_batches), "--log-every", "50",
    ]  # fmt: skip
    trials = [(name, m) for name in chosen for m in mults]
    rows: list[dict] = []
    t_start = time.time()

    with tempfile.TemporaryDirectory() as tmp:

        def one(trial):
            name, mult = trial
            lr = base_lr * mult
            flags = [*common, *chosen[name], "--lr", f"{lr:g}"]
            if name == "DDP":
                flags += ["--workers", "1", "--batch-size", str(args.workers * args.batch_size)]
            else:
                flags += ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]
            out = Path(tmp) / f"{name.replace(' ', '_').replace(':', '')}_{mult:g}"
            t0 = time.time()
            try:
                run = train(out, flags, timeout=3600)
            except Exception as e:  # noqa: BLE001 - a failed trial is listed, not hidden
                return {"method": name, "lr": lr, "error": str(e)[-400:]}
            s = json.loads((run / "summary.json").read_text())
            sent = ddp_bytes(args, steps) if name == "DDP" else s["bytes_sent_per_worker"]
            return {
                "method": name,
                "lr": lr,
                "eval_loss": s["final_eval_loss"],
                "bytes_per_worker": sent,
                "seconds": time.time() - t0,
                "tokens": steps * global_tokens_per_step,
            }

        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            for row in pool.map(one, trials):
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                                     "steps": steps, "rows": rows}, indent=1))  # fmt: skip
    text = table(rows, args)
    print(text)
    print(f"total {time.time() - t_start:.0f} s")
    if args.append:
        append_results(
            f"Fair study: best of {len(mults)} trials per method ({args.model}, {args.workers} "
            f"workers, {steps * global_tokens_per_step / 1e6:.1f}M tokens, H={args.sync_every})",
            "python " + " ".join(sys.argv),
            text,
        )


def table(rows: list[dict], args) -> str:
    ok = [r for r in rows if "eval_loss" in r]
    ddp = next((r["bytes_per_worker"] for r in ok if r["method"] == "DDP"), None)
    best: dict[str, dict] = {}
    for r in ok:
        if r["method"] not in best or r["eval_loss"] < best[r["method"]]["eval_loss"]:
            best[r["method"]] = r
    lines = [
        "| method | best eval loss | at lr | bytes per worker | fewer than DDP | every trial (lr: loss) |",
        "|---|---|---|---|---|---|",
    ]
    for name, b in sorted(best.items(), key=lambda kv: kv[1]["eval_loss"]):
        trials = ", ".join(
            f"{r['lr']:.2g}: {r['eval_loss']:.4f}" if "eval_loss" in r else f"{r['lr']:.2g}: failed"
            for r in rows
            if r["method"] == name
        )
        ratio = f"{ddp / b['bytes_per_worker']:,.0f}x" if ddp and b["bytes_per_worker"] else "1x"
        lines.append(
            f"| {name} | {b['eval_loss']:.4f} | {b['lr']:.2g} | {int(b['bytes_per_worker']):,} | "
            f"{ratio} | {trials} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
