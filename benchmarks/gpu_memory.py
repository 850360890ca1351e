"""Question: how much GPU memory does one training step of a lowband preset take, and how close is
`lowband plan`'s memory term (lowband.plan.cost.memory_bytes) to it?

    python benchmarks/gpu_memory.py --configs 125m:8:1024,1b:4:1024 --compile 125m:8:1024 --out $OUT
    python benchmarks/gpu_memory.py --device cpu --configs 1m:2:64      # smoke test (no peak)

Each configuration PRESET:BATCH:SEQ runs the step `lowband train` runs on a GPU (bf16 autocast,
fused AdamW from lowband.train.compute.adamw, eager or torch.compile as `--compile` lists): two
warm-up steps (so AdamW's moments exist, as in every step after the first), then
torch.cuda.reset_peak_memory_stats and one measured step. Reported: peak allocated bytes
(cuda.max_memory_allocated: live tensors, not the allocator's cache), the bytes held between
steps (parameters, gradients, moments), their difference (what the step itself adds: activations,
autocast's bf16 weight copies, temporaries), and the plan's prediction for DDP on that workload.
Writes gpu_memory.json and gpu_memory.md to --out (default $OUT, else ./gpu_memory_out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowband.models import PRESETS, build_model  # noqa: E402
from lowband.plan.cost import Technique, Workload, memory_bytes  # noqa: E402
from lowband.train.compute import adamw, prepare_model  # noqa: E402


def parse_config(spec: str) -> tuple[str, int, int]:
    preset, batch, seq = spec.split(":")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return preset, int(batch), int(seq)


def measure(preset: str, batch: int, seq: int, compiled: bool, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    model = build_model(preset, seed=0, device=device)
    prepare_model(model, compile=compiled, activation_checkpointing=False)
    opt = adamw(model, lr=1e-4, weight_decay=0.0, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step() -> None:
        with autocast:
            loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    params = sum(p.numel() for p in model.parameters())
    row = {"preset": preset, "batch": batch, "seq": seq, "compiled": compiled, "params": params}
    if cuda:
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["held_bytes"] = held
    c = model.cfg
    w = Workload(params, c.n_layers, c.dim, batch, seq, 0, 1.0, ffn_dim=c.ffn_dim)
    row["predicted_bytes"] = memory_bytes(w, Technique("ddp"), compiled=compiled)
    if cuda:
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    gib = 2**30
    out = [
        "| model | batch x seq | step | peak GiB (measured) | held between steps GiB | step adds GiB "
        "| plan predicts GiB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "peak_bytes" not in r:
            continue
        err = r["predicted_bytes"] / r["peak_bytes"] - 1
        out.append(
            f"| {r['preset']} | {r['batch']} x {r['seq']} | "
            f"{'compiled' if r['compiled'] else 'eager'} | {r['peak_bytes'] / gib:.2f} | "
            f"{r['held_bytes'] / gib:.2f} | {(r['peak_bytes'] - r['held_bytes']) / gib:.2f} | "
            f"{r['predicted_bytes'] / gib:.2f} | {err:+.1%} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="125m:8:1024,350m:8:1024,1b:4:1024")
    ap.add_argument("--compile", default="", help="configurations to run compiled as well")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_memory_out"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    runs = [(c, False) for c in args.configs.split(",") if c]
    runs += [(c, True) for c in args.compile.split(",") if c]
    rows = []
    for spec, compiled in runs:
        preset, batch, seq = parse_config(spec)
        try:
            rows.append(measure(preset, batch, seq, compiled, device))
        except torch.OutOfMemoryError as e:  # reported, not hidden
            rows.append({"preset": preset, "batch": batch, "seq": seq, "error": str(e)[:200]})
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.machine(),
        "command": "python benchmarks/gpu_memory.py " + " ".join(argv or sys.argv[1:]),
    }
    (out / "gpu_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "gpu_memory.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
