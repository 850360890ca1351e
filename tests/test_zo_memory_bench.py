"""benchmarks/zo_memory.py runs on CPU (the GPU figure comes from the same code) and reports ZO
below first-order AdamW."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_zo_memory_script_on_cpu(tmp_path):
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("zo_memory", ROOT / "benchmarks" / "zo_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "mem.json"
    argv = ["--device", "cpu", "--model", "1m", "--batch-size", "2", "--seq-len", "16"]
    mod.main([*argv, "--json", str(out)])
    r = json.loads(out.read_text())
    assert set(r) >= {"fo_adamw_bytes", "zo_bytes", "ratio", "param_bytes", "method", "params"}
    assert set(r["zo_bytes"]) == {"copy", "host", "arith"}
    p = r["param_bytes"]
    assert p == 4 * r["params"]  # fp32
    # AdamW holds theta, its gradient and two moments (+ a step counter per tensor).
    assert 4 * p <= r["fo_adamw_bytes"] < 4 * p + 4096
    assert r["zo_bytes"] == {"copy": 2 * p, "host": 2 * p, "arith": p}  # host == device on a CPU
    for mode, b in r["zo_bytes"].items():
        assert b < r["fo_adamw_bytes"] and r["ratio"][mode] == b / r["fo_adamw_bytes"]
