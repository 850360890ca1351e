"""DDP vs DiLoCo vs Streaming DiLoCo with several workers sharing one GPU, over an emulated link.

`lowband train --workers N --device cuda` on a machine with fewer GPUs than workers places the
workers round-robin on the GPUs over Gloo (lowband.launch.local.gpu_of). Each run here is that
command; the figures come from its summary.json and its steady-state metrics:
  utilisation   compute time over wall-clock per worker (lowband's own figure; with N workers on
                one GPU a worker's compute time includes waiting for the shared GPU)
  vs compiled   the run's tokens/s over a bare compiled step's tokens/s on the same GPU measured
                in the same call (benchmarks/gpu_step.py's 'bare compiled', one process, the
                same per-worker batch): the honest share of the GPU the run turns into training
  vs no link    the run's tokens/s over the same run's without the emulated link (--baseline):
                what the link costs, with the GPU shared the same way in both
  steady compute / exposed comm
                rank 0's compute time and blocked communication time over wall-clock in the
                steady window (the first quarter and the final step left out)
  bytes/worker  bytes each worker sent
DDP all-reduces every step, so at 1 Gbit/s a 125M model spends seconds per step on the link; it
runs `--ddp-steps` (its steady state does not depend on the count) while the others run `--steps`.

    python benchmarks/gpu_shared.py --workers 4 --model 125m --link 1gbit:50ms --append
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_results, steady_state, train  # noqa: E402
from benchmarks.gpu_step import _batches, _free, _step_fn, _timed  # noqa: E402
from lowband.models import build_model  # noqa: E402
from lowband.train.compute import adamw  # noqa: E402


def bare_compiled(args, device) -> float:
    model = build_model(args.model, seed=0, device=device)
    opt = adamw(model, lr=1e-4, weight_decay=0.1, device=device)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    ns = argparse.Namespace(batch_size=args.batch_size, seq_len=args.seq_len, warmup=3, steps=10)
    rate, _ = _timed(
        _step_fn(torch.compile(model.loss), opt, autocast), _batches(ns, device), ns, device
    )
    del model, opt
    _free()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--model", default="125m")
    p.add_argument("--link", default="1gbit:50ms")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ddp-steps", type=int, default=12)
    p.add_argument("--sync-every", type=int, default=32, help="H (a multiple of 4 fragments)")
    p.add_argument("--algos", default="ddp,diloco,streaming-diloco")
    p.add_argument("--sparse", default="topk:0.02:2", help="--compress of the sparse runs")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run each algorithm without the emulated link (the 'vs no link' column)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda")
    bare = bare_compiled(args, device)
    print(f"bare compiled step, one process: {bare:,.0f} tokens/s", flush=True)
    h = str(args.sync_every)
    runs = {
        "ddp": [],
        "diloco": ["--algo", "diloco", "--sync-every", h],
        "streaming-diloco": [
            "--algo", "streaming-diloco", "--sync-every", h, "--fragments", "4", "--overlap", "2",
            "--bits", "4",
        ],
        "streaming-eager": [
            "--algo", "streaming-diloco", "--sync-every", h, "--fragments", "4", "--bits", "4",
            "--outer", "eager",
        ],
        "sparse": ["--algo", "diloco", "--sync-every", h, "--compress", args.sparse,
                   "--outer-lr", "1.0"],
        "sparse-eager": ["--algo", "diloco", "--sync-every", h, "--compress", args.sparse,
                         "--outer-lr", "1.0", "--outer", "eager"],
    }  # fmt: skip

    def one(name: str, flags: list[str], steps: int, link: str | None) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            run = train(
                Path(tmp) / name,
                [
                    "--workers", str(args.workers), "--device", "cuda", "--model", args.model,
                    "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                    *(["--link", link] if link else []), "--steps", str(steps),
                    "--log-every", "2", "--eval-every", str(steps), "--eval-batches", "2",
                    "--ckpt-every", "-1", *flags,
                ],
            )  # fmt: skip
            return {
                "summary": json.loads((run / "summary.json").read_text()),
                "meta": json.loads((run / "meta.json").read_text()),
                "steady": steady_state(run, skip_fraction=0.25),
            }

    rows = []
    for name, flags in runs.items():
        if name not in args.algos.split(","):
            continue
        steps = args.ddp_steps if name == "ddp" else args.steps
        got = one(name, flags, steps, args.link)
        summary, steady = got["summary"], got["steady"]
        row = {
            "algo": name,
            "steps": steps,
            "tokens_per_s": steady["tokens_per_s"],
            "utilisation": summary["compute_utilisation"],
            "steady_compute": steady["compute_fraction"],
            "steady_exposed_comm": steady["comm_fraction"],
            "vs_compiled": steady["tokens_per_s"] / bare,
            "bytes_sent_per_worker": summary["bytes_sent_per_worker"],
            "final_eval_loss": summary["final_eval_loss"],
            "sharing": got["meta"].get("gpu_sharing", {}).get("note"),
        }
        if args.baseline:
            free = one(name, flags, steps, None)["steady"]
            row["no_link_tokens_per_s"] = free["tokens_per_s"]
            row["vs_no_link"] = steady["tokens_per_s"] / free["tokens_per_s"]
            row["no_link_steady_compute"] = free["compute_fraction"]
        rows.append(row)
        print(f"  {json.dumps(row)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"bare_compiled": bare, "rows": rows}, indent=1))
    pct = lambda r, k: f"{100 * r[k]:.0f}%" if k in r else "-"  # noqa: E731
    lines = [
        "| algorithm | steps | tokens/s (steady) | utilisation (compute / wall, whole run) | "
        "steady compute / wall | steady exposed comm / wall | tokens/s vs one bare compiled "
        "step | tokens/s vs the same run with no link | MB sent per worker | final eval loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['algo']} | {r['steps']} | {r['tokens_per_s']:,.0f} | {pct(r, 'utilisation')} | "
            f"{pct(r, 'steady_compute')} | {pct(r, 'steady_exposed_comm')} | "
            f"{pct(r, 'vs_compiled')} | {pct(r, 'vs_no_link')} | "
            f"{r['bytes_sent_per_worker'] / 1e6:,.0f} | {r['final_eval_loss']:.3f} |"
        )
    lines.append(
        f"\nbare compiled step of the same model and per-worker batch, one process on the same GPU: "
        f"{bare:,.0f} tokens/s. {rows[0]['sharing']}."
    )
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results(
            f"{args.workers} workers sharing one GPU: DDP vs DiLoCo vs Streaming DiLoCo, "
            f"{args.model} over {args.link}",
            "python " + " ".join(sys.argv),
            text,
        )


if __name__ == "__main__":
    main()
