"""Restarted workers killed while they join or heal: do the healthy workers survive, and is anything lost?

Each scenario is the chaos test's run (tests/test_elastic.py, joiner kill) with another schedule:
`lowband train --elastic --algo diloco --workers 3`, worker 1 killed (-9) at step 12 and restarted;
its first restarts kill themselves (`--kill-joiner`) that many seconds after joining (waiting for
their quorum, or inside the heal: the 100 Mbit/s link makes the ~17 MB state transfer last
~1.4 s); the next restart heals. Counted from the run's own metrics and events:
  kills       worker deaths (the kill -9 plus the joiners that killed themselves)
  completed   the job finished with exit 0 and every worker's summary
  commits     committed synchronisations on rank 0; discarded: rounds a joiner died in
  digests     committed steps whose shared-state digests were compared across workers, and how
              many of them disagreed (must be 0)

    python benchmarks/joiner_kill.py --append
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, append_results  # noqa: E402

SCHEDULES = ["0.1", "0.3,1.2", "0.65", "1.0,0.3", "2.0"]
COMMON = [
    "--model", "1m", "--batch-size", "4", "--seq-len", "64", "--eval-batches", "2",
    "--log-every", "1", "--threads", "1", "--workers", "3", "--elastic", "--algo", "diloco",
    "--sync-every", "10", "--fail-at", "1:12", "--restarts", "4", "--link", "100mbit:5ms",
    "--heartbeat-timeout", "2", "--timeout", "10", "--steps", "200", "--eval-every", "200",
]  # fmt: skip


def records(run: Path) -> dict[int, list[dict]]:
    return {
        int(f.stem[4:]): [json.loads(x) for x in f.read_text().splitlines() if x]
        for f in sorted((run / "metrics").glob("rank*.jsonl"))
    }


def events(run: Path, kind: str) -> list[dict]:
    out = [r for recs in records(run).values() for r in recs if r.get("event") == kind]
    launcher = run / "metrics" / "events.jsonl"
    if launcher.exists():
        out += [e for e in map(json.loads, launcher.read_text().splitlines()) if e["event"] == kind]
    return out


def scenario(schedule: str, root: Path) -> dict:
    out = root / schedule.replace(",", "_")
    cmd = [sys.executable, "-m", "lowband.cli", "train", "--out", str(out), *COMMON]
    cmd += ["--kill-joiner", schedule]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    digests: dict[int, set[str]] = defaultdict(set)
    for recs in records(out).values():
        for rec in recs:
            if "event" not in rec and rec.get("shared_digest") is not None:
                digests[rec["committed"]].add(rec["shared_digest"])
    rank0 = [rec for rec in records(out).get(0, []) if "event" not in rec]
    summary = json.loads((out / "summary.json").read_text()) if r.returncode == 0 else {}
    return {
        "kill_joiner": schedule,
        "exit": r.returncode,
        "kills": len(events(out, "worker_died")),
        "restarts": len(events(out, "worker_restarted")),
        "healed": len(events(out, "recovered")),
        "completed": r.returncode == 0 and not summary.get("elastic", {}).get("failed"),
        "commits": rank0[-1]["outer_step"] if rank0 and "outer_step" in rank0[-1] else None,
        "discarded": len(
            {e["local_step"] for e in events(out, "sync_discarded") if e["rank"] == 0}
        ),
        "digests_compared": len(digests),
        "digests_differing": sum(len(v) > 1 for v in digests.values()),
        "stderr_tail": r.stderr.strip().splitlines()[-1:] if r.returncode else [],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--schedules", default=";".join(SCHEDULES), help="';'-separated --kill-joiner values"
    )
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in args.schedules.split(";"):
            rows.append(scenario(schedule, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "| --kill-joiner (s after joining) | kills | restarts | healed | completed | commits (rank 0) "
        "| discarded rounds | digests compared | differing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kill_joiner']} | {r['kills']} | {r['restarts']} | {r['healed']} | "
            f"{'yes' if r['completed'] else 'NO'} | {r['commits']} | {r['discarded']} | "
            f"{r['digests_compared']} | {r['digests_differing']} |"
        )
    kills = sum(r["kills"] for r in rows)
    survived = sum(r["completed"] for r in rows)
    lines.append(
        f"\nTotal: {kills} kills in {len(rows)} runs, {survived} of {len(rows)} runs completed, "
        f"{sum(r['digests_compared'] for r in rows)} committed steps compared, "
        f"{sum(r['digests_differing'] for r in rows)} with differing digests."
    )
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results(
            "Joiners killed mid-join or mid-heal (`--elastic`, 3 workers, DiLoCo H=10, 200 steps)",
            "python " + " ".join(sys.argv),
            text,
        )


if __name__ == "__main__":
    main()
