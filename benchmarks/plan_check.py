"""`lowband plan`'s predictions against real runs over emulated links: bytes, step time, utilisation.

For each (workers, link, technique) cell, `lowband train` runs on CPU workers; its steady state
gives the measured step time and compute time per step. The plan's prediction takes that
measured compute time as its input (compute is measured, never modelled) and predicts the
communication: step time = compute + exposed communication, utilisation, bytes. Bytes must be
exact; time and utilisation are reported with their error.

    python benchmarks/plan_check.py --parallel 3 --json out.json --append
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
from lowband.comm import LinkSpec  # noqa: E402
from lowband.models import PRESETS, build_model  # noqa: E402
from lowband.plan import Technique, Workload, predict  # noqa: E402

TECHNIQUES = [
    Technique("ddp"),
    Technique("diloco", sync_every=10, bits=32),
    Technique("streaming-diloco", sync_every=10, fragments=2, overlap=2, bits=4),
]


def _window(run: Path, steps: int, period: int) -> dict:
    """Step time and compute fraction between two lines at whole sync periods (after a quarter of
    the run, before the last step): each period's syncs counted once, as the model counts them."""
    lines = [json.loads(x) for x in (run / "metrics" / "rank0.jsonl").read_text().splitlines()]
    at = {m["step"]: m for m in lines if "step" in m and "event" not in m}
    marks = [s for s in sorted(at) if s % period == 0 and steps / 4 <= s < steps]
    a, b = at[marks[0]], at[marks[-1]]
    wall = b["wall_time"] - a["wall_time"]
    return {
        "step_time_s": wall / (b["step"] - a["step"]),
        "compute_fraction": (b["compute_time"] - a["compute_time"]) / wall,
    }


def cell(args, tmp: Path, n: int, link: str, t: Technique) -> dict:
    out = tmp / f"{n}_{link.replace(':', '_')}_{t.algo}"
    run = train(
        out,
        [
            "--model", args.model, "--workers", str(n), "--link", link, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--log-every", "2",
            "--eval-every", str(args.steps), "--eval-batches", "1", "--ckpt-every", "-1",
            *t.flags(),
        ],
    )  # fmt: skip
    steady = _window(run, args.steps, 10)
    summary = json.loads((run / "summary.json").read_text())
    compute_s = steady["compute_fraction"] * steady["step_time_s"]
    model = build_model(args.model, device="meta")
    c = PRESETS[args.model]
    w = Workload(
        params=model.num_params(), layers=c.n_layers, dim=c.dim, batch_size=args.batch_size,
        seq_len=args.seq_len, tokens=args.steps * n * args.batch_size * args.seq_len,
        tokens_per_s=args.batch_size * args.seq_len / compute_s, model=model,
    )  # fmt: skip
    p = predict(w, t, n, LinkSpec.parse(link))
    return {
        "workers": n,
        "link": link,
        "technique": t.label(),
        "bytes_measured": summary["bytes_sent_per_worker"],
        "bytes_predicted": 8 * (n - 1) + args.steps * p.bytes_per_step,
        "step_measured": steady["step_time_s"],
        "step_predicted": p.step_s,
        "util_measured": steady["compute_fraction"],
        "util_predicted": p.utilisation,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="1m")
    p.add_argument("--workers", default="2,4")
    p.add_argument("--links", default="100mbit:20ms,1gbit:5ms")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    cells = [
        (int(n), link, t)
        for n in args.workers.split(",")
        for link in args.links.split(",")
        for t in TECHNIQUES
    ]
    with (
        tempfile.TemporaryDirectory() as tmp,
        concurrent.futures.ThreadPoolExecutor(args.parallel) as pool,
    ):
        rows = list(pool.map(lambda c: cell(args, Path(tmp), *c), cells))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    lines = [
        "| workers | link | technique | bytes measured = predicted | step ms measured / predicted "
        "(error) | utilisation measured / predicted |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = r["step_predicted"] / r["step_measured"] - 1
        same = "yes" if r["bytes_measured"] == r["bytes_predicted"] else "NO"
        lines.append(
            f"| {r['workers']} | {r['link']} | {r['technique']} | {same} ({r['bytes_measured']:,.0f}) | "
            f"{1e3 * r['step_measured']:.1f} / {1e3 * r['step_predicted']:.1f} ({100 * err:+.0f}%) | "
            f"{100 * r['util_measured']:.0f}% / {100 * r['util_predicted']:.0f}% |"
        )
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results(
            f"lowband plan: predicted vs measured ({args.model}, {args.steps} steps, CPU workers)",
            "python " + " ".join(sys.argv),
            text,
        )


if __name__ == "__main__":
    main()
