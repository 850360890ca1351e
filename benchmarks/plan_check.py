"""`lowband plan`'s predictions against real runs over emulated links: bytes, step time, utilisation.

For each (workers, link, technique) cell, `lowband train` runs on CPU workers (a metrics line per
step on every rank); its steady state gives the measured step time (each rank's wall per step,
averaged) and utilisation (each rank's compute over its wall, averaged). The plan's prediction
takes as inputs what is measured, never modelled, and predicts the rest:
  compute      every rank's compute time of every step of the window (the mean is t_c, their
               spread the wait for the slowest worker at each sync: lowband.plan.cost
               .straggler_wait)
  transport    the real transport's own time per collective: `lowband probe --workers N` run
               here first, without a link (its all-reduces with the emulation off), once per N
and predicts the communication: step time = compute + wait + exposed communication, utilisation,
bytes. Bytes must be exact; time and utilisation are reported with their error, next to the
prediction without the two measured terms (rank 0's compute, no transport: the model before #17).
The last worker to reach a sync waits only for the communication: its wait (`exposed, last
worker`) is the measured counterpart of the predicted link + transport time.

    python benchmarks/plan_check.py --parallel 3 --json out.json --append
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_results, train  # noqa: E402
from lowband.comm import LinkSpec  # noqa: E402
from lowband.models import PRESETS, build_model  # noqa: E402
from lowband.plan import Technique, Workload, predict  # noqa: E402
from lowband.plan.cost import sync_period  # noqa: E402

TECHNIQUES = [
    Technique("ddp"),
    Technique("diloco", sync_every=10, bits=32),
    Technique("streaming-diloco", sync_every=10, fragments=2, overlap=2, bits=4),
]
PERIOD = 10
"""Every technique's syncs repeat every 10 steps: windows are whole multiples of it."""


def _ranks(run: Path) -> list[dict[int, dict]]:
    """Every rank's metrics lines by step."""
    out = []
    files = sorted((run / "metrics").glob("rank*.jsonl"), key=lambda f: int(f.stem[4:]))
    for f in files:
        lines = [json.loads(x) for x in f.read_text().splitlines()]
        out.append({m["step"]: m for m in lines if "step" in m and "event" not in m})
    return out


def _window(run: Path, steps: int, sync_steps: int) -> dict:
    """Between two lines at whole sync periods (after a quarter of the run, before the last step):
    each rank's wall and compute per step, every rank's compute of every step, and the last
    worker's wait per sync (the smallest of the ranks' blocked times over each sync period)."""
    ranks = _ranks(run)
    marks = [s for s in sorted(ranks[0]) if s % PERIOD == 0 and steps / 4 <= s < steps]
    a, b = marks[0], marks[-1]

    def d(r: dict, key: str, s0: int, s1: int) -> float:
        return r[s1][key] - r[s0][key]

    walls = [d(r, "wall_time", a, b) for r in ranks]
    computes = [d(r, "compute_time", a, b) for r in ranks]
    periods = list(range(a, b, sync_steps))
    last = sum(min(d(r, "comm_time", s, s + sync_steps) for r in ranks) for s in periods)
    return {
        "step_time_s": statistics.mean(walls) / (b - a),
        "utilisation": statistics.mean(c / w for c, w in zip(computes, walls, strict=True)),
        "rank0_compute_s": computes[0] / (b - a),
        "step_times": [
            [d(r, "compute_time", s - 1, s) for s in range(a + 1, b + 1)] for r in ranks
        ],
        "exposed_last_s": last / (b - a),
    }


def transport(args, tmp: Path, n: int) -> tuple[LinkSpec | None, LinkSpec | None]:
    """`lowband probe --workers n` (no link) on the run's device, its all-reduces as large as
    the model (the runs' reductions are): (its all-reduce transport, its quantized all-reduce's
    transport), measured with the emulation off."""
    if args.transport:
        return LinkSpec.parse(args.transport), None
    if n == 1:
        return None, None
    out = tmp / f"probe{n}.json"
    megabytes = 4 * build_model(args.model, device="meta").num_params() / 1e6
    train(
        out,
        ["--workers", str(n), "--model", args.model, "--batch-size", str(args.batch_size),
         "--seq-len", str(args.seq_len), "--steps", "2", "--device", args.device,
         "--megabytes", f"{megabytes:.3f}"],
        command="probe",
    )  # fmt: skip
    t = json.loads(out.read_text())["transport"]
    q = t.get("quantized")
    return (
        LinkSpec(bandwidth_bps=t["bandwidth_bps"], latency_s=t["latency_s"]),
        q and LinkSpec(bandwidth_bps=q["bandwidth_bps"], latency_s=q["latency_s"]),
    )


def cell(args, tmp: Path, n: int, link: str, t: Technique, trs: tuple) -> dict:
    out = tmp / f"{n}_{link.replace(':', '_')}_{t.algo}"
    run = train(
        out,
        [
            "--model", args.model, "--workers", str(n), "--link", link, "--steps", str(args.steps),
            "--device", args.device,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--log-every", "1",
            "--eval-every", str(args.steps), "--eval-batches", "1", "--ckpt-every", "-1",
            *t.flags(),
        ],
    )  # fmt: skip
    tr, qtr = trs
    k = sync_period(t)[0]
    steady = _window(run, args.steps, k)
    summary = json.loads((run / "summary.json").read_text())
    model = build_model(args.model, device="meta")
    c = PRESETS[args.model]
    tokens = args.batch_size * args.seq_len
    mean_s = statistics.mean(x for row in steady["step_times"] for x in row)
    w = Workload(
        params=model.num_params(), layers=c.n_layers, dim=c.dim, batch_size=args.batch_size,
        seq_len=args.seq_len, tokens=args.steps * n * tokens, tokens_per_s=tokens / mean_s,
        model=model, transport=tr, quantized_transport=qtr, step_times=steady["step_times"],
    )  # fmt: skip
    p = predict(w, t, n, LinkSpec.parse(link))
    before = predict(
        dataclasses.replace(
            w, tokens_per_s=tokens / steady["rank0_compute_s"], transport=None,
            quantized_transport=None, step_times=None,
        ),
        t, n, LinkSpec.parse(link),
    )  # fmt: skip
    # the all-reduce's transport standing in for the quantized one's (the model of 8fcddf5)
    allreduce_only = predict(
        dataclasses.replace(w, quantized_transport=None), t, n, LinkSpec.parse(link)
    )
    return {
        "workers": n,
        "link": link,
        "technique": t.label(),
        "bytes_measured": summary["bytes_sent_per_worker"],
        "bytes_predicted": 8 * (n - 1) + args.steps * p.bytes_per_step,
        "step_measured": steady["step_time_s"],
        "step_predicted": p.step_s,
        "step_before": before.step_s,
        "step_allreduce_transport": allreduce_only.step_s,
        "util_measured": steady["utilisation"],
        "util_predicted": p.utilisation,
        "util_before": before.utilisation,
        "compute_s": w.compute_s,
        "straggler_s": p.straggler_s,
        "exposed_last_worker_s": steady["exposed_last_s"],
        "exposed_predicted_s": p.exposed_s,
        "exposed_link_only_s": before.exposed_s,
        "transport": str(tr) if tr else None,
        "quantized_transport": str(qtr) if qtr else None,
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
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the workers share the GPUs)")
    p.add_argument(
        "--transport", help="BANDWIDTH:LATENCY instead of probing the transport (e.g. 8gbit:0.1ms)"
    )
    p.add_argument("--only", help="comma-separated --algo values (default: all three)")
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    if args.steps < 3 * PERIOD:
        p.error(f"--steps must be at least {3 * PERIOD}: whole periods of {PERIOD} after a quarter")
    workers = [int(n) for n in args.workers.split(",")]
    techniques = [t for t in TECHNIQUES if not args.only or t.algo in args.only.split(",")]
    with (
        tempfile.TemporaryDirectory() as tmp,
        concurrent.futures.ThreadPoolExecutor(args.parallel) as pool,
    ):
        probed = {n: transport(args, Path(tmp), n) for n in workers}  # before the cells, alone
        cells = [
            (n, link, t, probed[n])
            for n in workers
            for link in args.links.split(",")
            for t in techniques
        ]
        rows = list(pool.map(lambda c: cell(args, Path(tmp), *c), cells))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    def err(x: float, ref: float) -> str:
        return f"{100 * (x / ref - 1):+.0f}%"

    lines = [
        "| workers | link | technique | bytes: measured = predicted | step ms measured / predicted "
        "(error) / without the measured terms (error) | utilisation measured / predicted / "
        "without | exposed ms per step: last worker / predicted (link only) | slowest-worker "
        "wait ms per step (predicted) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "yes" if r["bytes_measured"] == r["bytes_predicted"] else "NO"
        m = r["step_measured"]
        lines.append(
            f"| {r['workers']} | {r['link']} | {r['technique']} | {same} ({r['bytes_measured']:,.0f}) | "
            f"{1e3 * m:.1f} / {1e3 * r['step_predicted']:.1f} ({err(r['step_predicted'], m)}) / "
            f"{1e3 * r['step_before']:.1f} ({err(r['step_before'], m)}) | "
            f"{100 * r['util_measured']:.0f}% / {100 * r['util_predicted']:.0f}% / "
            f"{100 * r['util_before']:.0f}% | "
            f"{1e3 * r['exposed_last_worker_s']:.1f} / {1e3 * r['exposed_predicted_s']:.1f} "
            f"({1e3 * r['exposed_link_only_s']:.1f}) | {1e3 * r['straggler_s']:.1f} |"
        )
    text = "\n".join(lines)
    text += "\n\ntransport (probed, emulation off): " + ", ".join(
        f"{n} workers {tr.bandwidth_bps / 1e9:.2f} Gbit/s, {1e6 * tr.latency_s:.0f} us per hop"
        + (
            f" (quantized all-reduce: {q.bandwidth_bps / 1e9:.2f} Gbit/s, "
            f"{1e6 * q.latency_s:.0f} us per hop)"
            if q is not None
            else ""
        )
        for n, (tr, q) in probed.items()
        if tr is not None
    )
    text += "\nstep ms predicted with the all-reduce's transport for the quantized one too: " + (
        ", ".join(
            f"{r['workers']} {r['link']} {r['technique']} {1e3 * r['step_allreduce_transport']:.1f}"
            for r in rows
            if r["technique"] != "DDP"
        )
    )
    print(text)
    if args.append:
        append_results(
            f"lowband plan: predicted vs measured ({args.model}, {args.steps} steps, CPU workers)",
            "python " + " ".join(sys.argv),
            text,
        )


if __name__ == "__main__":
    main()
