"""Every own-loop example learns on the standard-library corpus, with a clean baseline beside each
attacked or compressed variant (issue #19, point 6). Each runs here as under torchrun (one process
per rank, the env:// rendezvous torchrun sets up), kept short with --steps; the full-length
figures are in the examples' docstrings.

Not here: examples/elastic_own_loop.py (tests/test_elastic.py kills and restarts it) and
examples/param_averaging.py (tests/test_new_algorithm.py).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from lowband.report import load_run, write_report

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LINE = re.compile(r"^(\S+(?: \S+)*?)\s+eval loss ([\d.]+) -> ([\d.]+)", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(example: str, n: int, *args: str, timeout: float = 120) -> str:
    """Run examples/<example> on n local processes as torchrun would; rank 0's stdout."""
    port = str(_free_port())
    procs = []
    for rank in range(n):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(n), "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, str(EXAMPLES / example), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} of {example}:\n{err[-3000:]}"
    return outs[0][0]


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def _losses(stdout: str) -> dict[str, tuple[float, float]]:
    return {m[1]: (float(m[2]), float(m[3])) for m in LINE.finditer(stdout)}


def test_ddp_own_loop_learns():
    out = _launch("ddp_own_loop.py", 2, "--steps", "12", "--link", "10gbit:1ms")
    ((start, end),) = _losses(out).values()
    assert start > 5.0 and end < start - 1.0, out


def test_diloco_against_ddp_in_your_own_loop_and_its_report(tmp_path):
    """DiLoCo sends far fewer bytes than DDP and both learn; their RunWriter folders (written
    by two real processes) go into one report."""
    out = _launch("diloco_vs_ddp_own_loop.py", 2, "--steps", "15", "--sync-every", "5",
                  "--link", "10gbit:1ms", "--out", str(tmp_path / "runs"))  # fmt: skip
    losses = _losses(out)
    assert set(losses) == {"ddp", "diloco"}, out
    for start, end in losses.values():
        assert start > 5.0 and end < start - 1.0, out
    ddp, diloco = (load_run(tmp_path / "runs" / name) for name in ("ddp", "diloco"))
    assert ddp.complete and diloco.complete
    assert list(ddp.eval_steps) == list(diloco.eval_steps) == [0, 15]
    assert diloco.final()["outer_steps"] == 3
    assert diloco.final()["bytes_sent_per_worker"] < ddp.final()["bytes_sent_per_worker"] / 4
    index = write_report([tmp_path / "runs" / "ddp", tmp_path / "runs" / "diloco"], tmp_path / "r")
    assert "<td>diloco</td>" in index.read_text()


def test_streaming_diloco_at_4_bits_beside_its_full_precision_baseline():
    out = _launch("streaming_diloco_own_loop.py", 2, "--steps", "12", "--sync-every", "8",
                  "--overlap", "1", "--link", "10gbit:1ms")  # fmt: skip
    losses = _losses(out)
    assert set(losses) == {"fp32", "int4"}, out
    for start, end in losses.values():
        assert start > 5.0 and end < start - 1.0, out
    sent = {name: _bytes(b) for name, b in re.findall(r"^(\S+) .*sent ([\d.]+ [KMG]?B)", out, re.M)}
    assert sent["int4"] < sent["fp32"] / 5, out


def test_robust_ddp_beside_its_clean_baseline():
    """3 workers, the last an IPM attacker: the average learns nothing, the trimmed mean learns
    about as the clean run does."""
    losses = _losses(_launch("robust_ddp_own_loop.py", 3, "--steps", "10"))
    assert set(losses) == {"clean", "ipm vs mean", "ipm vs trimmed-mean"}, losses
    (start, clean), (_, attacked), (_, defended) = losses.values()
    assert start > 5.0 and clean < start - 1.0
    assert attacked > start - 0.1  # -2 x the honest mean cancels the two honest gradients
    assert defended < clean + 0.2


def test_sequence_parallel_own_loop_learns():
    ((start, end),) = _losses(
        _launch("seqpar_own_loop.py", 2, "--steps", "10", "--seq-len", "256")
    ).values()
    assert start > 5.0 and end < start - 1.0
