"""Shared by the benchmark scripts: run `lowband train`, read its steady-state figures, record results."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def machine() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPU cores"
    return f"CPU {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, no GPU"


def train(out: Path, flags: list[str], timeout: float = 1800, command: str = "train") -> Path:
    """Run `lowband train` (or another `command`, e.g. finetune) in a fresh process, as a user
    would, and return its run folder."""
    cmd = [sys.executable, "-m", "lowband.cli", command, "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return out


def steady_state(run: Path, skip_fraction: float = 0.2) -> dict:
    """Figures from rank 0's metrics between the end of warm-up and the last step before the final one.

    The final step (evaluation, checkpoint) and the first steps (allocator, caches) are left out.
    """
    lines = [json.loads(x) for x in (run / "metrics" / "rank0.jsonl").read_text().splitlines()]
    last_step = lines[-1]["step"]
    window = [
        m
        for m in lines
        if m["step"] >= skip_fraction * last_step and m["step"] < last_step and "eval_loss" not in m
    ]
    a, b = window[0], window[-1]
    steps = b["step"] - a["step"]
    wall = b["wall_time"] - a["wall_time"]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "tokens_per_s": (b["tokens"] - a["tokens"]) / wall,
        "step_time_s": wall / steps,
        "bytes_sent_per_step": (b["bytes_sent"] - a["bytes_sent"]) / steps,
        "comm_fraction": (b["comm_time"] - a["comm_time"]) / wall,
        "compute_fraction": (b["compute_time"] - a["compute_time"]) / wall,
        "final_eval_loss": summary["final_eval_loss"],
    }


def append_results(title: str, command: str, table: str, notes: str = "") -> None:
    block = (
        f"\n## {title}\n\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command}`\n\n{table}\n"
    )
    if notes:
        block += f"\n{notes}\n"
    with open(RESULTS, "a") as f:
        f.write(block)


def torchrun_or_smoke(worker, args) -> int:
    """Run worker(rank, world, port, args): once here under torchrun (port 0: the environment
    has the rendezvous), or with `args.smoke` as 2 CPU processes started here."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0, args)
        return 0
    if not args.smoke:
        print("run under torchrun on GPUs, or with --smoke on CPU", file=sys.stderr)
        return 2
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)
    return 0
