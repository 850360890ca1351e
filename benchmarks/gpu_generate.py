"""Question: on one GPU, how fast does `lowband generate` decode next to Hugging Face
`transformers` `generate` on a model of the same shape and the same weights?

    python benchmarks/gpu_generate.py --models 125m,1b --batch 1,8 --prompt-len 128 \
        --new-tokens 128 --compile --out $OUT
    python benchmarks/gpu_generate.py --device cpu --tiny          # smoke test, seconds

For each model and batch size, in one process: a lowband preset built from its seed (bf16 on
CUDA, fp32 on CPU) and a `transformers` LlamaForCausalLM built offline from a LlamaConfig of the
same shape (dim, layers, heads, kv heads, FFN width, vocab 256, rope theta, norm eps) into which
the lowband weights are copied: same architecture (rotate-half rotary, RMSNorm, SwiGLU), same
weights (the output head scaled by 30 in both, so greedy choices have margins), same random
prompt, greedy decoding of exactly --new-tokens tokens (no EOS).

- lowband: `lowband.serve.engine.decode_loop` over `CachedModel` (the preallocated KVCache of
  `lowband generate`), eager, and with --compile also `torch.compile(dynamic=True)` of the
  model's forward_cached (a failure to compile is reported in the table, not hidden).
- transformers: `model.generate(..., do_sample=False, use_cache=True)` with its DynamicCache.

Reported per row: TTFT (prefill + first token; for transformers a separate generate of one new
token), decode tokens/s (the tokens after the first over the time after the first), overall
tokens/s, peak GPU memory, and how many greedy tokens agree with the other library before the
first difference (bf16 rounds differently in the two, so near-ties can split; fp32 on CPU
agrees). Each measurement is the best of --repeats after one warm-up. Writes gpu_generate.json
and gpu_generate.md to --out (default $OUT, else ./gpu_generate_out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowband.models import PRESETS, ModelConfig, build_model  # noqa: E402
from lowband.serve.engine import CachedModel, decode_loop  # noqa: E402
from lowband.serve.sampling import Sampler  # noqa: E402

HEAD_SCALE = 30.0
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256)


def hf_twin(model, device, dtype):
    """A transformers LlamaForCausalLM of the lowband model's shape, holding its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype)
    names = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
    parts = {
        "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
    }  # fmt: skip
    state = {}
    for key, value in model.state_dict().items():
        head, _, rest = key.partition(".")
        if head in names:
            state[f"{names[head]}.{rest}"] = value
        else:  # layers.I.PART.weight
            _, i, *part = key.split(".")
            state[f"model.layers.{i}.{parts['.'.join(part[:-1])]}.{part[-1]}"] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def sharpen(model) -> None:
    """Scale the output head by HEAD_SCALE: random weights give near-uniform logits whose argmax
    bf16 rounding decides (the two libraries then part at the first token); with margins the
    greedy comparison means something. Speed is unchanged."""
    model.output.weight.mul_(HEAD_SCALE)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_lowband(model, prompt_BL, new: int):
    B, L = prompt_BL.shape
    out = decode_loop(CachedModel(model, B, L + new), prompt_BL, new, Sampler(0.0))
    return out["tokens"], out["ttft_s"], out["total_s"]


@torch.no_grad()
def run_hf(hf, prompt_BL, new: int):
    kw = dict(attention_mask=torch.ones_like(prompt_BL), do_sample=False, use_cache=True)
    sync(prompt_BL.device)
    t0 = time.perf_counter()
    hf.generate(prompt_BL, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(prompt_BL.device)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = hf.generate(prompt_BL, max_new_tokens=new, min_new_tokens=new, **kw)
    sync(prompt_BL.device)
    total = time.perf_counter() - t0
    return ids[:, prompt_BL.shape[1] :].tolist(), ttft, total


def best_of(fn, repeats: int):
    fn()  # warm-up (and, compiled, the compilation)
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r[2])


def agree(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens equal before the first difference, the smallest over the batch's rows."""
    n = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        n.append(k)
    return min(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="125m,1b")
    p.add_argument("--batch", default="1,8", help="batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="bf16 (CUDA default) or fp32 (CPU default)")
    p.add_argument("--compile", action="store_true", help="also lowband with torch.compile")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-dim model, short run")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_generate_out")
    args = p.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU (use --device cpu --tiny)")
    dtype_name = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    models = ["tiny"] if args.tiny else args.models.split(",")
    if args.tiny:
        args.prompt_len, args.new_tokens, args.repeats = 16, 8, 1
    rows = []
    for name in models:
        shape = TINY if name == "tiny" else PRESETS[name]
        model = build_model(shape, seed=0, device=args.device, dtype=dtype).eval()
        model.requires_grad_(False)
        sharpen(model)
        hf = hf_twin(model, args.device, dtype)
        variants = [("lowband eager", model)]
        if args.compile:
            compiled = build_model(shape, seed=0, device=args.device, dtype=dtype).eval()
            compiled.requires_grad_(False)
            sharpen(compiled)
            compiled.forward_cached = torch.compile(compiled.forward_cached, dynamic=True)
            variants.append(("lowband torch.compile", compiled))
        for B in map(int, args.batch.split(",")):
            g = torch.Generator().manual_seed(B)
            prompt_BL = torch.randint(0, 256, (B, args.prompt_len), generator=g).to(args.device)
            results = {}
            for label, m in variants:
                if torch.device(args.device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    results[label] = best_of(
                        lambda m=m, x=prompt_BL: run_lowband(m, x, args.new_tokens), args.repeats
                    )
                except Exception as e:  # noqa: BLE001 - the row says what failed
                    results[label] = e
                results[label + " mem"] = (
                    torch.cuda.max_memory_allocated() if args.device != "cpu" else None
                )
            if torch.device(args.device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            results["transformers generate"] = best_of(
                lambda h=hf, x=prompt_BL: run_hf(h, x, args.new_tokens), args.repeats
            )
            results["transformers generate mem"] = (
                torch.cuda.max_memory_allocated() if args.device != "cpu" else None
            )
            hf_tokens = results["transformers generate"][0]
            lb_tokens = results["lowband eager"]
            lb_tokens = lb_tokens[0] if not isinstance(lb_tokens, Exception) else None
            for label in [v[0] for v in variants] + ["transformers generate"]:
                r = results[label]
                row = {
                    "model": name, "impl": label, "batch": B, "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "dtype": dtype_name, "device": args.device,
                    "peak_mem_bytes": results[label + " mem"],
                }  # fmt: skip
                if isinstance(r, Exception):
                    row["error"] = f"{type(r).__name__}: {str(r).splitlines()[0][:200]}"
                else:
                    tokens, ttft, total = r
                    other = hf_tokens if label != "transformers generate" else lb_tokens
                    row.update(
                        ttft_s=ttft, total_s=total,
                        tokens_per_s=B * args.new_tokens / total,
                        decode_tokens_per_s=B * (args.new_tokens - 1) / max(total - ttft, 1e-9),
                        agree_tokens=None if other is None else agree(tokens, other),
                    )  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model, hf, variants
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
        write(rows, args, quiet=True)  # after every model: a run cut short keeps what it measured
    write(rows, args)


def write(rows: list[dict], args, quiet: bool = False) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    meta = {
        "command": "python benchmarks/gpu_generate.py " + shlex.join(sys.argv[1:]),
        "device": dev or args.device, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    (out / "gpu_generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"- machine: {meta['device']}, torch {meta['torch']}, transformers "
        f"{meta.get('transformers')}; date {meta['date']}",
        f"- command: `{meta['command']}`",
        "",
        "| model | batch | implementation | TTFT ms | decode tokens/s | overall tokens/s "
        "| peak GPU MB | greedy tokens equal to the other library |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:,.0f}"
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['impl']} | failed: {r['error']} | | | {mem} | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['impl']} | {r['ttft_s'] * 1e3:.1f} | "
            f"{r['decode_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {mem} | "
            f"{r['agree_tokens']} of {r['new_tokens']} |"
        )
    (out / "gpu_generate.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
