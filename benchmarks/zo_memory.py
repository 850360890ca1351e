"""Peak memory of one zeroth-order step vs one first-order AdamW step on the same model and batch.

One question: how much less memory does ZO fine-tuning need? (issue 8 target: <= 0.4x for ~1B.)

  FO:  forward + backward + AdamW step (+ zero_grad), two steps so the optimizer state exists.
  ZO:  one `lowband.zo` step: two forwards under no_grad (theta +- eps z) and the in-place
       update, for each restore mode: copy (exact, saved copy on the device), host (exact, saved
       copy in host memory), arith (MeZO: re-add z, no copy, drifts by rounding).
Parameters are kept in --dtype (default fp32, as `lowband train` keeps them); on CUDA the forwards
run under bf16 autocast, as in `lowband train` and `lowband finetune` (the ZO forwards without
autocast's weight-cast cache, which would hold a bf16 copy of every weight for a backward that
never comes).

Measurement:
  cuda  torch.cuda.max_memory_allocated() over the step, after reset_peak_memory_stats (bytes of
        live tensors at the peak: parameters, copies, gradients, optimizer state, activations).
  cpu   no allocator peak to read, so the bytes of the tensors each method keeps alive across the
        step, counted from the real tensors: parameters, the saved copy (host memory is the device
        memory here, so "host" counts it too), gradients and AdamW state.
        Activations are not counted (they favour ZO further: its forwards keep none).

    python benchmarks/zo_memory.py --device cuda --model 1b --batch-size 4 --seq-len 1024 --append
    python benchmarks/zo_memory.py --device cpu --model 1m --json out.json     # the tested path
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_results  # noqa: E402
from lowband.models import build_model  # noqa: E402
from lowband.zo import apply_update_, spsa_grad  # noqa: E402

MODES = ("copy", "host", "arith")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _batch(args, vocab: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=gen)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def measure(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build_model(args.model, seed=0, device=device, dtype=DTYPES[args.dtype])
    params = list(model.parameters())
    batch = _batch(args, model.cfg.vocab_size, device)
    param_bytes = _tensor_bytes(params)

    def loss_fn(m, b, cache: bool = True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda, cache_enabled=cache):
            return m.loss(*b)

    def zo_loss_fn(m, b):  # as lowband finetune runs it: no bf16 weight-cast cache
        return loss_fn(m, b, cache=False)

    def peak(step) -> int:
        if not cuda:
            return step()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)

    zo = {}
    for i, mode in enumerate(MODES):

        def zo_step(mode=mode, i=i) -> int:
            g = spsa_grad(model, zo_loss_fn, batch, seed=i, eps=1e-3, restore=mode)
            apply_update_(params, i, g, lr=1e-7)
            # What the step held besides theta: on a CPU, "host" keeps its copy in the same memory.
            copy = param_bytes if mode == "copy" or (mode == "host" and not cuda) else 0
            return param_bytes + copy

        zo[mode] = peak(zo_step)

    opt = torch.optim.AdamW(params, lr=1e-7, foreach=cuda)

    def fo_step() -> int:
        for _ in range(2):
            loss_fn(model, batch).backward()
            opt.step()
            held = param_bytes + _tensor_bytes(p.grad for p in params if p.grad is not None)
            held += _tensor_bytes(
                v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
            )
            opt.zero_grad(set_to_none=True)
        return held

    fo = peak(fo_step)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "model": args.model,
        "params": sum(p.numel() for p in params),
        "param_dtype": args.dtype,
        "autocast": "bf16" if cuda else "none",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "method": "cuda.max_memory_allocated" if cuda else "bytes of tensors held (no activations)",
        "param_bytes": param_bytes,
        "fo_adamw_bytes": fo,
        "zo_bytes": zo,
        "ratio": {mode: zo[mode] / fo for mode in MODES},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--append", action="store_true", help="append a block to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    r = measure(args)
    print(json.dumps(r, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    if args.append:
        gib = 2**30
        rows = [f"| first-order AdamW | {r['fo_adamw_bytes'] / gib:.2f} | 1.00x |"]
        rows += [
            f"| ZO, restore={m} | {r['zo_bytes'][m] / gib:.2f} | {r['ratio'][m]:.2f}x |"
            for m in MODES
        ]
        table = "| step | peak GiB | vs AdamW |\n|---|---|---|\n" + "\n".join(rows)
        append_results(
            f"ZO vs first-order peak memory ({args.model}, {r['params']:,} params, "
            f"{args.dtype} parameters, batch {args.batch_size} x {args.seq_len}, {r['device']})",
            "python " + " ".join(["benchmarks/zo_memory.py", *(argv or sys.argv[1:])]),
            table,
            f"Measured with {r['method']}.",
        )
    return r


if __name__ == "__main__":
    main()
