"""Question: on a GPU, does every parallel mode of `lowband generate` give the single-process
tokens, in fp32 and in bf16? (#18's exactness check; on CPU it is tests/test_serve_parallel.py.)

    python benchmarks/gpu_parallel_tokens.py --model 125m --workers 2 --out $OUT
    python benchmarks/gpu_parallel_tokens.py --device cpu --model 1m        # the same on CPU

For each dtype: one process generates greedily from a fixed prompt (the reference), then W worker
processes sharing the device (Gloo, host-staged on one GPU) run tp (ring and star), pp, splitwise
and lamina on the same weights (seed), one after the other in the same group. Reported: for each
mode, how many of the new tokens equal the reference's before the first difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowband.serve.config import GenerateConfig  # noqa: E402
from lowband.serve.worker import generate  # noqa: E402

MODES = [
    {"parallel": "tp", "allreduce": "ring"},
    {"parallel": "tp", "allreduce": "star"},
    {"parallel": "pp"},
    {"parallel": "splitwise"},
    {"parallel": "lamina"},
]


def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="125m")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt", default="def quicksort(items):\n    ")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_parallel_tokens_out"))
    args = p.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        base = GenerateConfig(
            model=args.model, prompt=args.prompt, max_new_tokens=args.new_tokens,
            device=args.device, dtype=dtype, quiet=True,
        )  # fmt: skip
        ref = generate(base)[0]["tokens"][0]
        multi = GenerateConfig(**{**base.to_dict(), "workers": args.workers, "parallel": "tp"})
        for mode, out in zip(MODES, generate(multi, MODES)):
            name = mode["parallel"] + (f"/{mode['allreduce']}" if "allreduce" in mode else "")
            rows.append({"dtype": dtype, "mode": name, "equal": agree(out["tokens"][0], ref),
                         "of": len(ref), "bytes_by_worker": out["bytes_sent_by_worker"]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_parallel_tokens.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| dtype | mode | new tokens equal to one process | bytes sent by worker |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['dtype']} | {r['mode']} | {r['equal']} of {r['of']} | {r['bytes_by_worker']} |"
        for r in rows
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
