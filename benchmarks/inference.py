"""Question: over a slow link, which split serves one user fastest: tensor parallel with a ring,
a star (TPI-LLM) or a tree all-reduce, pipeline parallel, Splitwise's prefill/decode pair,
Lamina's attention offload, or one process (also with its weights streamed from disk)? Does the
link model predict it?

    python benchmarks/inference.py --models 1m,10m --workers 2,4 --links 300mbit:5ms,1gbit:1ms

Every configuration runs as `lowband generate` does: worker processes started by
lowband.launch.local, Gloo on CPU, one thread each, an emulated --link (lowband.comm). For each
(model, link, workers) one group of processes runs tp/ring, tp/star, tp/tree (power-of-two
workers) and pp one after the other (and, on 2 workers, splitwise and lamina) on the same prompt
(greedy), so process start-up is paid once; one process without a link is the baseline. Printed
per row: TTFT, mean and median TBT, the link model's communication time per decoded token
(`predicted`), bytes sent per token by the busiest worker, and whether the tokens equal the
single process's. Prints a markdown table (the caller appends it to RESULTS.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from lowband.comm import LinkSpec
from lowband.models import PRESETS, count_params
from lowband.serve import GenerateConfig, generate
from lowband.serve.allreduce import predicted_seconds
from lowband.serve.config import check_tp_split

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def predicted_tbt_comm(mode: str, model: str, workers: int, link: LinkSpec) -> float:
    """Link-model seconds of communication per decoded token (B = 1, fp32 activations)."""
    c = PRESETS[model]
    if mode.startswith("tp/"):
        return 2 * c.n_layers * predicted_seconds(mode[3:], c.dim * 4, workers, link)
    if mode == "splitwise":  # decoding is local; the KV cache moves once, before the first token
        return 0.0
    if mode == "lamina":  # per layer: q, k, v out, attention back (one memory worker each way)
        out = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * 4
        return c.n_layers * (link.ideal_time(out, 1) + link.ideal_time(c.dim * 4, 1))
    # pp: W - 1 activations forward, then the token back to stage 0
    return (workers - 1) * link.ideal_time(c.dim * 4, 1) + link.ideal_time(8, 1)


def window_budget_mb(model: str) -> float:
    """A budget that holds the embedding, head and KV cache and two layers (plus 2%)."""
    c = PRESETS[model]
    layer = (
        2 * c.dim * c.dim
        + 2 * c.dim * c.n_kv_heads * c.head_dim
        + 3 * c.dim * c.ffn_dim
        + 2 * c.dim
    ) * 4
    resident = (
        2 * c.vocab_size * c.dim + c.dim
    ) * 4 + 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4 * 128
    return (resident + 2 * layer) * 1.02 / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="1m,10m")
    p.add_argument("--workers", default="2,4")
    p.add_argument("--links", default="300mbit:5ms,1gbit:1ms")
    p.add_argument(
        "--new-tokens", type=int, default=16
    )  # prompt + new tokens <= 128 (the budget's cache)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model in args.models.split(","):
        base = GenerateConfig(
            model=model, prompt=PROMPT, max_new_tokens=args.new_tokens, quiet=True
        )
        (one,) = generate(base)
        rows.append((model, "none", 1, "single", one, 0.0, one["tokens"]))
        # the sliding window at two layers' room: weights mostly on disk (TPI-LLM's scheduler)
        budget = GenerateConfig(**{**base.to_dict(), "memory_budget": window_budget_mb(model)})
        (streamed,) = generate(budget)
        total_mb = count_params(PRESETS[model]) * 4 / 2**20
        name = (
            f"single, --memory-budget {budget.memory_budget:.1f} MB ({total_mb:.1f} MB of weights)"
        )
        rows.append((model, "none", 1, name, streamed, 0.0, one["tokens"]))
        for spec in args.links.split(","):
            link = LinkSpec.parse(spec)
            for w in map(int, args.workers.split(",")):
                c = PRESETS[model]
                modes = []
                try:
                    check_tp_split(c.n_heads, c.n_kv_heads, c.ffn_dim, w)
                    modes += [
                        {"parallel": "tp", "allreduce": "ring"},
                        {"parallel": "tp", "allreduce": "star"},
                    ]
                    if w & (w - 1) == 0:
                        modes.append({"parallel": "tp", "allreduce": "tree"})
                except Exception as e:  # noqa: BLE001 - the split is refused: say so in the table
                    print(f"{model} x{w}: tp skipped: {e}", file=sys.stderr)
                if w <= c.n_layers:
                    modes.append({"parallel": "pp"})
                if w == 2:  # 1 + 1 workers: Splitwise's prefill/decode pair, Lamina's offload
                    modes += [{"parallel": "splitwise"}, {"parallel": "lamina"}]
                if not modes:
                    continue
                cfg = GenerateConfig(**{**base.to_dict(), "workers": w, "link": spec, **modes[0]})
                for m, r in zip(modes, generate(cfg, modes)):
                    name = f"tp/{m['allreduce']}" if m["parallel"] == "tp" else m["parallel"]
                    rows.append(
                        (
                            model,
                            spec,
                            w,
                            name,
                            r,
                            predicted_tbt_comm(name, model, w, link),
                            one["tokens"],
                        )
                    )
                    print(
                        f"{model} {spec} x{w} {name}: TBT {r['tbt_mean_s'] * 1e3:.1f} ms",
                        file=sys.stderr,
                    )
    print(f"command: `python benchmarks/inference.py {shlex.join(sys.argv[1:])}`\n")
    print(
        "| model | link | workers | mode | TTFT ms | TBT mean ms | TBT p50 ms | predicted comm per token ms "
        "| bytes per token (busiest worker) | same tokens as single |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    n = args.new_tokens
    for model, spec, w, name, r, pred, ref in rows:
        per_token = max(r["bytes_sent_by_worker"]) / n
        print(
            f"| {model} | {spec} | {w} | {name} | {r['ttft_s'] * 1e3:.1f} | {r['tbt_mean_s'] * 1e3:.1f} "
            f"| {r['tbt_p50_s'] * 1e3:.1f} | {pred * 1e3:.1f} | {per_token:,.0f} | "
            f"{'yes' if r['tokens'] == ref else 'NO'} |"
        )
    for model, _, _, name, r, _, _ in rows:
        if "memory" in r:
            m = r["memory"]
            print(
                f"\n{model} {name}: peak {m['peak_bytes'] / 2**20:.2f} MB of {m['budget_bytes'] / 2**20:.2f} "
                f"MB (window {m['window']} layers of {m['layer_bytes'] / 2**20:.2f} MB, "
                f"{m['layer_loads']} layer loads)"
            )


if __name__ == "__main__":
    main()
