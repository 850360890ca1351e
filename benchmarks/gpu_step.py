"""Tokens/s of one training step on one GPU: `lowband train` against a bare step of the same model.

For each preset, in one process and on one GPU (random tokens, bf16 autocast, fp32 parameters,
AdamW with betas (0.9, 0.95), batch x seq tokens per step):
  bare eager      model.loss, backward, fused AdamW step, zero_grad: nothing else
  bare compiled   the same with torch.compile over the whole loss function
  hf eager        transformers' LlamaForCausalLM of the same shape (sdpa attention), same step
  lowband         `lowband train --workers 1 --device cuda` in a fresh process (compiled blocks by
                  default), its steady state read from its own metrics (lines between 25% of the
                  steps and the step before the last, so compile, warm-up and the final
                  evaluation are left out)
  lowband eager   the same with --no-compile
and the GPU's bf16 matmul rate (8192^3 on random data) measured in the same run: model FLOPs per
token = 6 N + 6 layers seq dim (N: all parameters), MFU = FLOPs/s over that measured rate.

Timing: after `--warmup` steps (the first of a compiled step compiles), `--steps` steps between two
torch.cuda.synchronize() calls; one measurement per variant (the figures are ratios measured side
by side, so a noisy machine moves them together).

--checks adds two correctness checks on the GPU: the first steps' losses of lowband's compiled
blocks against eager from the same weights and batches (bf16 tolerance), and the ZO perturbation
generator's numbers on the GPU (eager and compiled) against the CPU's, bit for bit.

    python benchmarks/gpu_step.py --presets 125m,350m,1b --checks --json $OUT/gpu_step.json --append
    python benchmarks/gpu_step.py --device cpu --presets 1m --batch-size 2 --seq-len 64 --steps 3 \\
        --warmup 1 --skip hf,compiled   # the CPU smoke path
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import append_results, steady_state, train  # noqa: E402
from lowband.models import PRESETS, build_model  # noqa: E402
from lowband.train.compute import adamw, prepare_model  # noqa: E402

VARIANTS = ("eager", "compiled", "hf", "lowband", "lowband-eager")


def matmul_tflops(device: torch.device) -> float:
    """Dense bf16 matmul rate on random data (8192^3, median of 20 after 3 warm-ups)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def _batches(args, device, n: int = 4):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=g)
        out.append((x[:, :-1].to(device), x[:, 1:].to(device)))
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, batches, args, device) -> tuple[float, list[float]]:
    """tokens/s of `steps` steps after `warmup`; the losses of the warm-up steps."""
    losses = [float(step(*batches[i % len(batches)])) for i in range(args.warmup)]
    if args.steps == 0:
        return float("nan"), losses
    _sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(*batches[i % len(batches)])
    float(loss)
    _sync(device)
    return args.steps * args.batch_size * args.seq_len / (time.perf_counter() - t0), losses


def _step_fn(loss_fn, opt, autocast):
    def step(x, y):
        with autocast():
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _hf_model(preset: str, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = PRESETS[preset]
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=max(4096, c.max_seq_len),
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(device)

    def loss(x, y):
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    return model, loss


def _free() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_preset(preset: str, args, device, peak: float) -> dict:
    c = PRESETS[preset]
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else nullcontext
    )
    batches = _batches(args, device)
    row: dict = {"preset": preset, "batch": args.batch_size, "seq": args.seq_len}
    n_params = build_model(preset, device="meta").num_params()
    row["params"] = n_params
    row["flops_per_token"] = 6 * n_params + 6 * c.n_layers * args.seq_len * c.dim
    for variant in ("eager", "compiled"):
        if variant in args.skip:
            continue
        model = build_model(preset, seed=0, device=device)
        opt = adamw(model, lr=1e-4, weight_decay=0.1, device=device)
        loss_fn = model.loss if variant == "eager" else torch.compile(model.loss)
        row[variant], _ = _timed(_step_fn(loss_fn, opt, autocast), batches, args, device)
        del model, opt, loss_fn
        _free()
        print(f"  {preset} {variant}: {row[variant]:,.0f} tokens/s", flush=True)
    if "hf" not in args.skip:
        model, loss_fn = _hf_model(preset, device)
        opt = adamw(model, lr=1e-4, weight_decay=0.1, device=device)
        row["hf"], _ = _timed(_step_fn(loss_fn, opt, autocast), batches, args, device)
        del model, opt, loss_fn
        _free()
        print(f"  {preset} hf: {row['hf']:,.0f} tokens/s", flush=True)
    for variant, flags in (("lowband", []), ("lowband-eager", ["--no-compile"])):
        if variant in args.skip:
            continue
        steps = max(args.lowband_steps, 8)
        with tempfile.TemporaryDirectory() as tmp:
            run = train(
                Path(tmp) / "run",
                [
                    "--workers", "1", "--device", device.type, "--model", preset,
                    "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                    "--steps", str(steps), "--log-every", str(max(1, steps // 8)),
                    "--eval-every", str(10 * steps), "--eval-batches", "1", "--ckpt-every", "-1",
                    *flags,
                ],
            )  # fmt: skip
            row[variant] = steady_state(run, skip_fraction=0.25)["tokens_per_s"]
        print(f"  {preset} {variant}: {row[variant]:,.0f} tokens/s", flush=True)
    for key in VARIANTS:
        if key in row and peak == peak:  # nan when there is no GPU
            row[f"{key}_mfu"] = row[key] * row["flops_per_token"] / (peak * 1e12)
    return row


def checks(device) -> dict:
    """Compiled blocks vs eager (first losses, bf16 tolerance); ZO noise GPU vs CPU, bit for bit."""
    from lowband.zo import rng

    out: dict = {}
    args = argparse.Namespace(batch_size=8, seq_len=512, warmup=5, steps=0)
    batches = _batches(args, device, n=5)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    losses = {}
    for compiled in (False, True):
        model = build_model("125m", seed=0, device=device)
        prepare_model(model, compile=compiled, activation_checkpointing=False)
        opt = adamw(model, lr=6e-4, weight_decay=0.1, device=device)
        _, losses[compiled] = _timed(_step_fn(model.loss, opt, autocast), batches, args, device)
        del model, opt
        _free()
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True], strict=True))
    out["compile_vs_eager"] = {"eager": losses[False], "compiled": losses[True], "max_rel": rel}
    shape, offset = (1 << 22,), 2**31 + 12345
    cpu = rng.counter_normal(7, offset, shape, "cpu")
    gpu_eager = rng.counter_normal(7, offset, shape, device).cpu()
    rng.configure(compile=True)
    gpu_compiled = rng.counter_normal(7, offset, shape, device).cpu()
    rng.configure(compile=False)
    out["zo_noise_cpu_equals_gpu_eager"] = bool(torch.equal(cpu, gpu_eager))
    out["zo_noise_cpu_equals_gpu_compiled"] = bool(torch.equal(cpu, gpu_compiled))
    print(f"  checks: {json.dumps(out)}", flush=True)
    return out


def table(rows: list[dict], peak: float) -> str:
    head = (
        "| preset | params | bare eager | bare compiled | HF Llama eager | lowband train "
        "| lowband --no-compile | lowband / bare compiled | lowband MFU |"
    )
    lines = [head, "|" + "---|" * 9]

    def f(r: dict, k: str) -> str:
        return f"{r[k] / 1e3:,.1f}k" if k in r else "-"

    for r in rows:
        ratio = (
            f"{r['lowband'] / r['compiled']:.2f}x" if "lowband" in r and "compiled" in r else "-"
        )
        mfu = f"{100 * r['lowband_mfu']:.0f}%" if "lowband_mfu" in r else "-"
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:,.0f}M | {f(r, 'eager')} | {f(r, 'compiled')} | "
            f"{f(r, 'hf')} | {f(r, 'lowband')} | {f(r, 'lowband-eager')} | {ratio} | {mfu} |"
        )
    lines.append(f"\nbf16 matmul rate measured in the same run: {peak:,.0f} TFLOP/s (8192^3).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="125m,350m,1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lowband-steps", type=int, default=40)
    p.add_argument("--skip", default="", help="comma-separated variants to leave out")
    p.add_argument("--checks", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    device = torch.device(args.device)
    peak = matmul_tflops(device)
    print(f"bf16 matmul: {peak:,.0f} TFLOP/s", flush=True)
    result: dict = {"peak_tflops": peak, "rows": []}
    if args.checks:
        result["checks"] = checks(device)
    for preset in args.presets.split(","):
        result["rows"].append(bench_preset(preset, args, device, peak))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    text = table(result["rows"], peak)
    print(text)
    if args.append:
        append_results(
            f"Training step on one GPU: lowband train vs a bare step (batch {args.batch_size} x "
            f"{args.seq_len}, bf16 autocast, AdamW)",
            "python " + " ".join(sys.argv),
            text,
        )


if __name__ == "__main__":
    main()
