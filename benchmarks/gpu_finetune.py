"""Tokens/s of `lowband finetune` (zeroth-order) on one GPU, perturbations drawn on the device.

Runs `lowband finetune --workers 1 --device cuda` in a fresh process, with the perturbation
generator compiled (the GPU default) and eager (--no-compile), and reads the steady state from
its metrics (between 25% of the steps and the step before the last). Peak memory against AdamW is
benchmarks/zo_memory.py's (run it beside this one).

    python benchmarks/gpu_finetune.py --model 1b --batch-size 4 --seq-len 1024 --append
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_results, steady_state, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--variants", default="compiled,eager")
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    rows = []
    for variant in args.variants.split(","):
        flags = [
            "--workers", "1", "--device", args.device, "--model", args.model,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--steps", str(args.steps), "--log-every", str(max(1, args.steps // 8)),
            "--eval-every", str(10 * args.steps), "--eval-batches", "1", "--ckpt-every", "-1",
            "--compile" if variant == "compiled" else "--no-compile",
        ]  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            run = train(Path(tmp) / variant, flags, command="finetune")
            steady = steady_state(run, skip_fraction=0.25)
        row = {"variant": variant, **steady}
        rows.append(row)
        print(f"  {json.dumps(row)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    lines = ["| perturbation generator | tokens/s (steady) | step time |", "|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_time_s']:.1f} ms |"
        )
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results(
            f"`lowband finetune` on one GPU ({args.model}, batch {args.batch_size} x {args.seq_len})",
            "python " + " ".join(sys.argv),
            text,
        )


if __name__ == "__main__":
    main()
