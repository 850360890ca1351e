"""Signals to the launcher: SIGTERM and SIGHUP stop the job like Ctrl-C, SIGKILL orphans nobody,
and a run stopped before its first checkpoint can be resumed (it starts again from step 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAST = ["--workers", "2", "--model", "1m", "--batch-size", "2", "--seq-len", "32",
        "--eval-batches", "1", "--log-every", "1", "--threads", "1"]  # fmt: skip


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def _start(run: Path, *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowband.cli", "train", "--out", str(run), *FAST, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    metrics = run / "metrics" / "rank1.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):  # both workers are training
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.2)
    return proc


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def test_sighup_is_handled_like_sigterm():
    from lowband.launch.signals import Stopped, stop_on_signals

    with pytest.raises(Stopped) as stopped, stop_on_signals():
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)  # the handler raises in the main thread before this returns
    assert stopped.value.signum == signal.SIGHUP and isinstance(stopped.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # restored after the block


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_stops_the_workers_and_says_how_to_resume(tmp_path, sig):
    run = tmp_path / "run"
    proc = _start(run, "--steps", "5000", "--ckpt-every", "5")
    workers = _children(proc.pid)
    assert len(workers) >= 2
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"lowband: stopped by {signal.Signals(sig).name}")
    assert "--resume" in lines[-1] and "Traceback" not in err
    assert _wait_gone(workers, 10) == [], "workers outlived their launcher"


def test_workers_do_not_outlive_a_killed_launcher(tmp_path):
    proc = _start(tmp_path / "run", "--steps", "5000")
    workers = _children(proc.pid)
    proc.kill()  # SIGKILL: nothing runs in the launcher
    proc.communicate(timeout=30)
    assert _wait_gone(workers, 15) == [], "orphaned workers kept training"


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "--steps", "40", "--ckpt-every", "0", "--eval-every", "20")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert not any((run / "ckpt").iterdir())  # stopped before any checkpoint
    done = subprocess.run(
        [sys.executable, "-m", "lowband.cli", "train", "--resume", str(run)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "starting it from step 0" in done.stderr
    lines = (run / "metrics" / "rank0.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if "event" not in r]
    assert steps == list(range(1, 41))  # the first attempt's lines were dropped, not kept twice
    assert json.loads((run / "summary.json").read_text())["steps"] == 40
