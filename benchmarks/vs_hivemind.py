"""Question: on one CPU task, how do lowband's, torchft's and hivemind's (OpenDiLoCo-style) DiLoCo
compare in loss, bytes and time?

    python3 -m venv /tmp/hmenv && /tmp/hmenv/bin/pip install torch==2.13.0 hivemind rich
    python benchmarks/vs_hivemind.py                      # 4 workers, 300 steps, H = 50
    python benchmarks/vs_hivemind.py --no-torchft --workers 2 --steps 100 --sync-every 20

hivemind pins protobuf, pydantic and grpcio versions, so it lives in its own virtual environment
(--hivemind-python); its workers import lowband from this checkout through PYTHONPATH. The PyPI
package `opendiloco` is an empty placeholder, so the OpenDiLoCo loop (pseudo-gradients averaged by
a hivemind DecentralizedAverager, outer Nesterov SGD) is rebuilt on hivemind's public API in
benchmarks/_hivemind_worker.py.

One job per peer, one after the other, same model preset, corpus, seed, workers, data
(ShardSampler), inner AdamW and schedule, outer Nesterov SGD (lr 0.7, momentum 0.9, fp32), H:

  * lowband: `lowband train --algo diloco --bits 32` (vs_torchft.run_lowband);
  * torchft 0.2.0: vs_torchft.run_torchft (Lighthouse + one replica group per worker);
  * hivemind 1.1.12: one _hivemind_worker.py process per worker, a DHT on 127.0.0.1, every round
    an all-N-peer DecentralizedAverager step (DHT matchmaking + butterfly all-reduce).

No link is emulated: hivemind's traffic goes through its own p2pd daemons, which lowband's link
model cannot slow down, so every peer runs on plain loopback (lowband without --link). Wall-clock
therefore compares compute plus protocol overhead, and bytes compare the protocols. lowband and
torchft bytes are their collectives under lowband's ring model; hivemind's are both modelled the
same way and measured from the kernel's per-socket TCP counters of its p2pd (see the worker).
Appends nothing itself: prints a table and a markdown block for RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine  # noqa: E402
from vs_torchft import (  # noqa: E402
    _children_cpu,
    _common_view,
    add_task_args,
    run_lowband,
    run_torchft,
    steady,
)

WORKER = Path(__file__).resolve().parent / "_hivemind_worker.py"


def run_hivemind(args, out: Path, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    n = args.workers
    common = [
        "--workers", str(n), "--out", str(out), "--model", args.model, "--seed", str(seed),
        "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--sync-every", str(args.sync_every),
        "--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum),
        "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
        "--matchmaking-time", str(args.matchmaking_time),
    ]  # fmt: skip
    t0, cpu0 = time.perf_counter(), _children_cpu()
    procs, logs = [], []
    try:
        for i in range(n):
            log = open(out / f"worker{i}.log", "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [args.hivemind_python, str(WORKER), "--rank", str(i), *common],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )  # fmt: skip
            )
        deadline = time.time() + args.timeout
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad or time.time() > deadline:
                tail = (out / f"worker{bad[0]}.log").read_text()[-3000:] if bad else "timeout"
                raise RuntimeError(f"hivemind worker(s) {bad or 'all'} failed:\n{tail}")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    job_wall, job_cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    raw = [json.loads((out / f"hivemind_rank{i}.json").read_text()) for i in range(n)]
    ranks = [{"records": d["records"], "bytes_sent": d["bytes_modelled"], "wall": d["wall_time"]}
             for d in raw]  # fmt: skip
    view = _common_view(
        ranks, init_bytes=[0] * n, loop_wall=max(d["wall_time"] for d in raw),
        job_wall=job_wall, job_cpu=job_cpu,
        extra={"num_params": raw[0]["num_params"], "version": raw[0]["hivemind_version"]},
    )  # fmt: skip
    view["measured_bytes_per_worker"] = statistics.fmean(d["bytes_sent"] for d in raw)
    view["measured_start_bytes_per_worker"] = statistics.fmean(
        d["bytes_sent_at_start"] for d in raw
    )
    view["rounds_ok"] = min(sum(r["ok"] and r["group_size"] == n for r in d["rounds"]) for d in raw)
    view["rounds"] = len(raw[0]["rounds"])
    view["averager_step_s"] = statistics.fmean(
        r["averager_step_s"] for d in raw for r in d["rounds"]
    )
    view["setup_s"] = statistics.fmean(d["setup_s"] for d in raw)
    view["tcp_connections"] = max(d["tcp_connections_seen"] for d in raw)
    return view


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_args(p)
    p.add_argument("--hivemind-python", default="/tmp/hmenv/bin/python")
    p.add_argument("--matchmaking-time", type=float, default=5.0,
                   help="hivemind min_matchmaking_time (hivemind's default)")  # fmt: skip
    p.add_argument("--no-torchft", action="store_true", help="run lowband and hivemind only")
    p.add_argument(
        "--race",
        action="store_true",
        help="run the jobs at the same time, so load that comes and goes on a shared machine "
        "slows all alike (each gets a share of the cores; CPU seconds cannot be told apart)",
    )
    p.add_argument("--out", default=None, help="folder for the runs (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    args.torchft_init_sync = False  # vs_torchft.run_torchft's default (identical seeded init)

    out = Path(args.out or tempfile.mkdtemp(prefix="vs_hivemind-"))
    out.mkdir(parents=True, exist_ok=True)
    H = args.sync_every
    names = ["lowband", "hivemind"] + ([] if args.no_torchft else ["torchft"])
    fns = {"lowband": run_lowband, "torchft": run_torchft, "hivemind": run_hivemind}
    res = {}
    if args.race:
        print(f"running {', '.join(names)} at the same time ...", flush=True)
        with concurrent.futures.ThreadPoolExecutor(len(names)) as ex:
            futs = {n_: ex.submit(fns[n_], args, out / n_, args.seed) for n_ in names}
            res = {n_: f.result() for n_, f in futs.items()}
        for r_ in res.values():
            r_["job_cpu"] = float("nan")
    for name in names:
        if not args.race:
            print(f"running {name} ({args.workers} workers, {args.steps} steps) ...", flush=True)
            res[name] = fns[name](args, out / name, args.seed)
        print(f"  {name}: job wall {res[name]['job_wall']:.1f} s", flush=True)
    (out / "results.json").write_text(json.dumps(res, default=str))

    sts = {k: steady(v, args.steps, H) for k, v in res.items()}
    final = args.steps
    mb = lambda b: f"{b / 1e6:.2f}"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    hm = res["hivemind"]
    rows = [
        ("eval loss @" + ", @".join(str(s) for s in sorted(res["lowband"]["evals"])),
         {k: " / ".join(f"{v['evals'][s]:.4f}" for s in sorted(v["evals"])) for k, v in res.items()}),
        (f"final eval loss (step {final})", {k: f"{v['evals'][final]:.4f}" for k, v in res.items()}),
        ("MB sent per worker, outer steps (ring/butterfly model)",
         {k: mb(v["sync_bytes_per_worker"]) for k, v in res.items()}),
        ("MB sent per worker, measured on its TCP sockets (training)",
         {"hivemind": mb(hm["measured_bytes_per_worker"])}),
        ("MB sent per worker, start-up", {**{k: mb(v["init_bytes_per_worker"]) for k, v in res.items()},
                                         "hivemind": mb(hm["measured_start_bytes_per_worker"]) + " (measured)"}),
        (f"ms/step, steady mean (steps {sts['lowband']['window'][0]}-{sts['lowband']['window'][1]})",
         {k: ms(v["mean"]) for k, v in sts.items()}),
        ("ms/step, inner steps only", {k: ms(v["inner"]) for k, v in sts.items()}),
        ("ms/step, outer-step steps (after the first)", {k: ms(v["outer"]) for k, v in sts.items()}),
        (f"ms, first outer step (step {H})", {k: ms(v["first_outer"]) for k, v in sts.items()}),
        ("training loop wall (s, incl. evals)", {k: f"{v['loop_wall']:.1f}" for k, v in res.items()}),
        ("job wall (s, incl. start-up)", {k: f"{v['job_wall']:.1f}" for k, v in res.items()}),
        ("job CPU seconds, all processes", {k: f"{v['job_cpu']:.1f}" for k, v in res.items()}),
    ]  # fmt: skip
    cols = [n for n in ("lowband", "torchft", "hivemind") if n in res]
    heads = {"lowband": "lowband DiLoCo", "torchft": "torchft DiLoCo",
             "hivemind": f"hivemind {hm['version']} (OpenDiLoCo-style)"}  # fmt: skip
    table = "| | " + " | ".join(heads[c] for c in cols) + " |\n|---" + "|---" * len(cols) + "|\n"
    table += "".join(
        f"| {label} | " + " | ".join(vals.get(c, "-") for c in cols) + " |\n"
        for label, vals in rows
    )
    d = res["lowband"]["evals"][final] - hm["evals"][final]
    notes = [
        f"hivemind rounds with all {args.workers} peers: {hm['rounds_ok']} of {hm['rounds']}; "
        f"mean averager.step (matchmaking + all-reduce, waiting for peers): "
        f"{hm['averager_step_s'] * 1e3:.0f} ms; DHT + averager start-up {hm['setup_s']:.1f} s; "
        f"TCP connections per p2pd: {hm['tcp_connections']}",
        f"measured / modelled hivemind bytes: "
        f"{hm['measured_bytes_per_worker'] / hm['sync_bytes_per_worker']:.4f}",
        f"final eval loss lowband - hivemind: {d:+.2e}",
    ]
    if "torchft" in res:
        notes.append(f"final eval loss lowband - torchft: "
                     f"{res['lowband']['evals'][final] - res['torchft']['evals'][final]:+.2e}")  # fmt: skip
    print(
        f"\nmachine: {machine()}\nruns in {out}\n\n{table}\n" + "\n".join(f"- {x}" for x in notes)
    )


if __name__ == "__main__":
    main()
