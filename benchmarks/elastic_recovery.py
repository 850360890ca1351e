"""Elastic training: what a crash or a newcomer costs, measured on the emulated link.

Three questions, each a real `lowband train --elastic` run (processes, torchft Lighthouse):

  kill        a worker is killed with SIGKILL right after a synchronisation and restarted; at the
              next synchronisation it heals from a live peer.
  join        a newcomer runs `lowband join RUN` mid-run and heals the same way.
  throughput  Streaming DiLoCo on 4 workers with one kill (and restart) per 20 outer steps
              against the same run without faults: wall-clock for the same steps and tokens.

For kill and join the figure is the survivors' *stall*: how much longer the synchronisation in
which the newcomer healed took than the median synchronisation of the run (both measured by the
survivors, quorum to commit), as a ratio to the ideal time to move the state the newcomer
received (model, AdamW moments, DiLoCo's global parameters and outer momentum) over the link
(`LinkSpec.ideal_time`, two latency hops). The events also give the newcomer's own download time
(emulated link included) and the time to load the state.

    python benchmarks/elastic_recovery.py --append
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, ROOT, machine, train  # noqa: E402

FAST = ["--batch-size", "4", "--seq-len", "64", "--eval-batches", "2", "--log-every", "5"]


def records(run: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted((run / "metrics").glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(x) for x in f.read_text().splitlines() if x]
    return out


def heal_stall(run: Path, newcomer: int) -> dict:
    """The survivors' extra synchronisation time in the round where `newcomer` healed."""
    recs = records(run)
    healed = next(e for e in recs[newcomer] if e.get("event") == "recovered")
    stalls, normal = [], []
    for rank, lines in recs.items():
        if rank == newcomer:
            continue
        syncs = {}  # step -> sync_s of the synchronisation at that step (from step records)
        for r in lines:
            if "event" not in r and "sync_s" in r:
                syncs.setdefault(r["committed"], r["sync_s"])
        normal += list(syncs.values())
        quorum = [e for e in lines if e.get("event") == "quorum" and e["step"] == healed["step"]]
        stalls += [e["sync_s"] for e in quorum]
    median = statistics.median(normal)
    stall = statistics.mean(stalls) - median
    return {
        "state_bytes": healed["bytes"],
        "ideal_transfer_s": healed["ideal_transfer_s"],
        "download_s": healed["transfer_s"],
        "load_s": healed["load_s"],
        "median_sync_s": median,
        "stall_s": stall,
        "ratio": stall / healed["ideal_transfer_s"],
    }


def run_kill(root: Path, common: list[str]) -> dict:
    run = train(root / "kill", [*common, "--fail-at", "2:25", "--restarts", "1"])
    return heal_stall(run, newcomer=2)


def run_join(root: Path, common: list[str]) -> dict:
    run = root / "join"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "RUST_LOG": "warn"}
    job = subprocess.Popen(
        [sys.executable, "-m", "lowband.cli", "train", "--out", str(run), *common],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not (run / "metrics" / "rank0.jsonl").exists() or not any(
        json.loads(x).get("step", 0) >= 25
        for x in (run / "metrics" / "rank0.jsonl").read_text().splitlines()
        if x
    ):
        if job.poll() is not None:
            raise RuntimeError(job.stderr.read()[-3000:])
        time.sleep(0.5)
    joiner = subprocess.run(
        [sys.executable, "-m", "lowband.cli", "join", str(run)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if joiner.returncode != 0 or job.wait(timeout=1800) != 0:
        raise RuntimeError(joiner.stderr[-3000:] + job.stderr.read()[-3000:])
    return heal_stall(run, newcomer=3)


def run_throughput(root: Path, steps: int, model: str, heartbeat: float) -> dict:
    flags = [
        "--model", model, *FAST, "--workers", "4", "--elastic", "--algo", "streaming-diloco",
        "--sync-every", "40", "--fragments", "4", "--overlap", "2", "--steps", str(steps),
        "--eval-every", str(steps), "--link", "1gbit:20ms", "--heartbeat-timeout", str(heartbeat),
    ]  # fmt: skip
    # Fragment syncs every 10 steps: one kill per 20 outer steps = one per 200 steps.
    kills = ",".join(f"{1 + i % 3}:{200 * i + 105}" for i in range(steps // 200))
    ref = train(root / "fault-free", flags)
    faulty = train(root / "faulty", [*flags, "--fail-at", kills, "--restarts", str(steps // 200)])
    wall = lambda r: json.loads((r / "summary.json").read_text())["wall_time"]  # noqa: E731
    loss = lambda r: json.loads((r / "summary.json").read_text())["final_eval_loss"]  # noqa: E731
    return {
        "kills": kills,
        "wall_fault_free": wall(ref),
        "wall_faulty": wall(faulty),
        "throughput_ratio": wall(ref) / wall(faulty),
        "loss_fault_free": loss(ref),
        "loss_faulty": loss(faulty),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="10m", help="preset for kill/join (its state is what moves)")
    p.add_argument("--link", default="1gbit:20ms")
    p.add_argument("--throughput-steps", type=int, default=800)
    p.add_argument("--throughput-model", default="1m")
    p.add_argument("--heartbeat-timeout", type=float, default=2.0)
    p.add_argument("--only", choices=["recovery", "throughput"], default=None)
    p.add_argument("--root", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--append", action="store_true", help="append the results to RESULTS.md")
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="elastic-recovery-"))
    common = [
        "--model", args.model, *FAST, "--workers", "3", "--elastic", "--algo", "diloco",
        "--sync-every", "20", "--steps", "80", "--eval-every", "80", "--link", args.link,
        "--heartbeat-timeout", str(args.heartbeat_timeout),
    ]  # fmt: skip
    block = f"""
## Elastic recovery and throughput under failures (`--elastic`, torchft 0.2.0 Lighthouse)

- date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
- machine: {machine()}
- command: `python benchmarks/elastic_recovery.py {" ".join(sys.argv[1:])}`
"""
    if args.only != "throughput":
        kill = run_kill(root, common)
        print("kill", json.dumps(kill), flush=True)
        join = run_join(root, common)
        print("join", json.dumps(join), flush=True)
        block += recovery_table(kill, join, args)
    if args.only != "recovery":
        tput = run_throughput(
            root, args.throughput_steps, args.throughput_model, args.heartbeat_timeout
        )
        print("throughput", json.dumps(tput), flush=True)
        block += throughput_text(tput, args)
    print(block)
    if args.append:
        with open(RESULTS, "a") as f:
            f.write(block)


def recovery_table(kill: dict, join: dict, args) -> str:
    row = lambda name, r: (  # noqa: E731
        f"| {name} | {r['state_bytes'] / 1e6:.1f} MB | {r['ideal_transfer_s']:.2f} s | "
        f"{r['download_s']:.2f} s | {r['load_s']:.2f} s | {r['median_sync_s']:.2f} s | "
        f"{r['stall_s']:.2f} s | {r['ratio']:.2f}x |"
    )
    return f"""
Kill and join: {args.model}, 3 workers, DiLoCo H=20, link {args.link}, heartbeat timeout
{args.heartbeat_timeout:g} s.

| event | state moved | ideal transfer | newcomer's download | load | median sync | survivors' stall | stall / ideal |
|---|---|---|---|---|---|---|---|
{row("kill -9 + restart", kill)}
{row("newcomer (`lowband join`)", join)}
"""


def throughput_text(tput: dict, args) -> str:
    return f"""
Streaming DiLoCo, 4 workers, {args.throughput_model}, H=40, P=4, TAU=2, 1gbit:20ms,
{args.throughput_steps} steps, heartbeat timeout {args.heartbeat_timeout:g} s,
one kill + restart per 20 outer steps (`--fail-at {tput["kills"]}`): wall-clock
{tput["wall_fault_free"]:.1f} s fault-free vs {tput["wall_faulty"]:.1f} s with failures:
throughput {100 * tput["throughput_ratio"]:.1f}% of fault-free; final eval loss
{tput["loss_fault_free"]:.4f} vs {tput["loss_faulty"]:.4f}.
"""


if __name__ == "__main__":
    main()
