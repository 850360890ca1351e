"""Soak test for `--elastic` (not in CI): a long run with a random worker SIGKILLed every ~30 s.

The job runs with `--restarts` large enough for every kill; a chaos thread here picks a random
live worker process of the launcher every `--every` seconds (exponentially distributed around
it) and kills it with SIGKILL. At the end it checks what the chaos tests check, over the whole
run:

  * the job finished and every worker that was not killed finished;
  * the committed-step counter never went back on any worker, and DiLoCo's outer steps are
    exactly the number of synchronisations (no committed update lost or applied twice);
  * after every committed step the workers that logged a shared-state digest agree on it;
  * no parity repair was needed.

    python benchmarks/elastic_soak.py --minutes 30 --every 30 --append
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, ROOT, machine  # noqa: E402


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (the launcher's workers), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def age_s(pid: int) -> float:
    """Seconds since process `pid` started (/proc/PID/stat field 22, in clock ticks since boot)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    start = int(stat[stat.rindex(")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - start


def workers_of(launcher: int) -> list[int]:
    # multiprocessing's spawn start method runs a resource tracker beside the workers: skip it.
    return [
        p
        for p in children(launcher)
        if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()
    ]


def check(run: Path) -> dict:
    digests: dict[int, set[str]] = defaultdict(set)
    problems = []
    for f in sorted((run / "metrics").glob("rank*.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x]
        steps = [r for r in lines if "event" not in r]
        committed = [r["committed"] for r in steps]
        if committed != sorted(committed):
            problems.append(f"{f.name}: committed counter went back")
        for r in steps:
            if r.get("shared_digest"):
                digests[r["committed"]].add(r["shared_digest"])
        # Every commit advances torchft's counter and applies one outer step, both together
        # (the counter starts at 1): a lost or doubled update would break the equality.
        bad = [r["step"] for r in steps if r["outer_step"] != r["committed"] - 1]
        if bad:
            problems.append(f"{f.name}: outer steps != commits at steps {bad[:5]}")
    last_commit = max(digests) if digests else 0
    split = [c for c, seen in digests.items() if len(seen) > 1]
    if split:
        problems.append(f"shared state differed after commits {sorted(split)[:10]}")
    events = [
        json.loads(x)
        for f in (run / "metrics").glob("*.jsonl")
        for x in f.read_text().splitlines()
        if x and '"event"' in x
    ]
    kinds = defaultdict(int)
    for e in events:
        kinds[e["event"]] += 1
    if kinds["parity_mismatch"]:
        problems.append(f"{kinds['parity_mismatch']} parity repairs")
    return {
        "commits_checked": len(digests),
        "last_commit": last_commit,
        "events": dict(kinds),
        "problems": problems,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long the chaos goes on")
    p.add_argument("--every", type=float, default=30.0, help="mean seconds between kills")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--steps", type=int, default=2_000_000, help="more than the soak can reach")
    p.add_argument("--sync-every", type=int, default=20)
    p.add_argument("--root", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--settle", type=float, default=30.0,
        help="no kill while a worker is younger than this (a restart still healing)",
    )  # fmt: skip
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    run = Path(args.root or tempfile.mkdtemp(prefix="elastic-soak-")) / "soak"
    flags = [
        "--model", "1m", "--batch-size", "4", "--seq-len", "64", "--eval-batches", "2",
        "--log-every", "10", "--eval-every", "500", "--workers", str(args.workers), "--elastic",
        "--algo", "diloco", "--sync-every", str(args.sync_every), "--steps", str(args.steps),
        "--restarts", "100000", "--heartbeat-timeout", "2", "--link", "1gbit:10ms",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_LOG": "warn"}
    job = subprocess.Popen(
        [sys.executable, "-m", "lowband.cli", "train", "--out", str(run), *flags],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rng = random.Random(args.seed)
    kills: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def chaos() -> None:
        while not stop.wait(rng.expovariate(1.0 / args.every)):
            try:
                pids = workers_of(job.pid)
                ages = [age_s(p) for p in pids]
            except OSError:  # a process ended while we looked
                continue
            # A restart must have healed before the next kill: with every worker that holds the
            # job's state dead at once, an elastic job has nothing to recover from (JobStateLost).
            if len(pids) < args.workers or min(ages) < args.settle:
                continue
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            kills.append((time.monotonic() - t0, victim))
            print(f"{kills[-1][0]:7.1f}s  kill -9 {victim}", flush=True)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    deadline = t0 + 60 * args.minutes
    progress_mark = [0]  # the highest commit seen at 3/4 of the soak
    while time.monotonic() < deadline and job.poll() is None:
        time.sleep(1)
        if not progress_mark[0] and time.monotonic() > t0 + 45 * args.minutes:
            progress_mark[0] = check(run)["last_commit"] + 1
    stop.set()
    thread.join()
    time.sleep(10)  # let the last restart heal and commit
    os.kill(job.pid, signal.SIGINT)  # the soak ends the job; the checks are on what it logged
    try:
        job.wait(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()
    result = check(run)
    result.update(kills=len(kills), minutes=(time.monotonic() - t0) / 60, run=str(run))
    # The job must have kept training to the end: commits in the last quarter of the soak.
    died = result["events"].get("worker_died", 0)
    if died > len(kills):
        result["problems"].append(f"{died - len(kills)} worker deaths not caused by the soak")
    if result["last_commit"] < progress_mark[0]:
        result["problems"].append("no commit in the last quarter of the soak: training stopped")
    print(json.dumps(result, indent=2))
    if args.append:
        ok = (
            "nothing lost"
            if not result["problems"]
            else "PROBLEMS: " + "; ".join(result["problems"])
        )
        block = f"""
## Elastic soak: {result["minutes"]:.0f} minutes, a random worker killed every ~{args.every:g} s

- date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
- machine: {machine()}
- command: `python benchmarks/elastic_soak.py {" ".join(sys.argv[1:])}`

{result["kills"]} kills -9 of {args.workers} DiLoCo workers (1m, H={args.sync_every}, 1gbit:10ms,
heartbeat timeout 2 s, restarts on); {result["commits_checked"]} committed synchronisations
checked for bit-identical shared state across workers; events {json.dumps(result["events"])}.
Result: {ok}.
"""
        with open(RESULTS, "a") as f:
            f.write(block)
        print(block)
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
