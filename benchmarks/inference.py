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


def predicted_lamina_prefill_comm(model: str, tokens: int, workers: int, link: LinkSpec) -> float:
    """Link-model seconds of lamina's prompt messages: per layer, worker 0 sends each of the
    M = W - 1 memory workers its heads' q, k, v of every prompt token (back to back on its
    uplink: they pipeline, one latency), and each sends its heads' attention back (they share
    worker 0's downlink, one latency)."""
    c = PRESETS[model]
    out = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * 4 * tokens
    back = c.n_heads * c.head_dim * 4 * tokens
    return c.n_layers * (link.ideal_time(out, 1) + link.ideal_time(back, 1))


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


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def single_tokens(base: GenerateConfig, prompts: list[str]) -> list[list[int]]:
    """Greedy tokens of each prompt from one process (in this one: the reference)."""
    from lowband.serve.engine import generate_local, load_model

    model = load_model(base, "cpu")
    return [
        generate_local(model, GenerateConfig(**{**base.to_dict(), "prompt": q}))["tokens"][0]
        for q in prompts
    ]


def part_pp_requests(args) -> None:
    """Several requests through pp: one at a time (each request alone through the stages) vs
    all of them in flight, dealt into M micro-batches (M = R: one request each; M = 1: one
    padded batch). Same workers, same link; tokens checked against one process."""
    from lowband.serve.requests import request_prompt

    n, new = args.requests, args.new_tokens
    print(f"command: `python benchmarks/inference.py {shlex.join(sys.argv[1:])}`\n")
    print(
        "| model | link | workers | schedule | tokens/s | TTFT p50 ms | TTFT p90 ms | TBT p50 ms "
        "| TBT p90 ms | bytes sent by stage 0 | same tokens as single |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        prompts = [request_prompt(PROMPT, i, n) for i in range(n)]
        base = GenerateConfig(model=model, prompt=PROMPT, max_new_tokens=new, quiet=True)
        refs = single_tokens(base, prompts)
        for spec in args.links.split(","):
            for w in map(int, args.workers.split(",")):
                alone = [{"prompt": q} for q in prompts]
                ms_list = sorted({n, max(1, n // 2), max(1, n // 4), 1}, reverse=True)
                batched = [{"requests": n, "micro_batches": m} for m in ms_list]
                cfg = GenerateConfig(
                    **{**base.to_dict(), "workers": w, "link": spec, "parallel": "pp"}
                )
                # the first request again, first: a warm-up whose result is dropped
                results = generate(cfg, alone[:1] + alone + batched)[1:]
                one, many = results[:n], results[n:]
                total = sum(r["total_s"] for r in one)
                gaps = sorted(g for r in one for g in [r["tbt_p50_s"]] if g is not None)
                ttfts = sorted(r["ttft_s"] for r in one)
                q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
                print(
                    f"| {model} | {spec} | {w} | one at a time | {n * new / total:.0f} | "
                    f"{ms(q(ttfts, 0.5))} | {ms(q(ttfts, 0.9))} | {ms(q(gaps, 0.5))} | "
                    f"{ms(q(gaps, 0.9))} | {sum(r['bytes_sent_by_worker'][0] for r in one):,} | "
                    f"{'yes' if [r['tokens'][0] for r in one] == refs else 'NO'} |"
                )
                for m, r in zip(ms_list, many):
                    name = f"{m} micro-batches of {n // m}" if m > 1 else f"1 batch of {n}"
                    print(
                        f"| {model} | {spec} | {w} | {name} | {r['tokens_per_s']:.0f} | "
                        f"{ms(r['ttft_p50_s'])} | {ms(r['ttft_p90_s'])} | {ms(r['tbt_p50_s'])} | "
                        f"{ms(r['tbt_p90_s'])} | {r['bytes_sent_by_worker'][0]:,} | "
                        f"{'yes' if r['tokens'] == refs else 'NO'} |"
                    )
                    sys.stdout.flush()


def part_stream(args) -> None:
    """splitwise (half the workers prefill, half decode) vs colocated (every worker both) under
    a Poisson stream of requests at several rates; the throughput at a latency target is the
    highest rate whose p90 TTFT and p90 TBT both meet the targets."""
    from lowband.serve.requests import request_prompt

    n, new = args.requests, args.new_tokens
    t_ttft, t_tbt = (float(x) / 1e3 for x in args.targets.split(","))
    rates = [float(x) for x in args.rates.split(",")]
    print(f"command: `python benchmarks/inference.py {shlex.join(sys.argv[1:])}`\n")
    print(
        "| model | link | workers | mode | offered req/s | served tokens/s | TTFT p50 ms | "
        "TTFT p90 ms | TBT p50 ms | TBT p90 ms | TBT max ms | bytes sent (busiest) | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    best: list[str] = []
    for model in args.models.split(","):
        base = GenerateConfig(model=model, prompt=PROMPT, max_new_tokens=new, quiet=True)
        refs = single_tokens(base, [request_prompt(PROMPT, i, n) for i in range(n)])
        for spec in args.links.split(","):
            for w in map(int, args.workers.split(",")):
                modes = [
                    {"parallel": mode, "arrival_rate": rate, "prefill_workers": pw}
                    for mode, pw in (("splitwise", w // 2), ("colocated", 1))
                    for rate in rates
                ]
                cfg = GenerateConfig(
                    **{**base.to_dict(), "workers": w, "link": spec, "requests": n, **modes[0]}
                )
                for m, r in zip(modes, generate(cfg, modes)):
                    name = (
                        f"splitwise {w - m['prefill_workers']}D+{m['prefill_workers']}P"
                        if m["parallel"] == "splitwise"
                        else "colocated"
                    )
                    print(
                        f"| {model} | {spec} | {w} | {name} | {m['arrival_rate']:g} | "
                        f"{r['tokens_per_s']:.0f} | {ms(r['ttft_p50_s'])} | {ms(r['ttft_p90_s'])} | "
                        f"{ms(r['tbt_p50_s'])} | {ms(r['tbt_p90_s'])} | {ms(r['tbt_max_s'])} | "
                        f"{max(r['bytes_sent_by_worker']):,} | {'yes' if r['tokens'] == refs else 'NO'} |"
                    )
                    sys.stdout.flush()
                    m["ok"] = r["ttft_p90_s"] <= t_ttft and r["tbt_p90_s"] <= t_tbt
                    m["served"] = r["tokens_per_s"]
                for mode in ("splitwise", "colocated"):
                    ok = [m for m in modes if m["parallel"] == mode and m["ok"]]
                    top = max(ok, key=lambda m: m["arrival_rate"]) if ok else None
                    best.append(
                        f"- {model} {spec} x{w} {mode}: "
                        + (
                            f"{top['arrival_rate']:g} requests/s ({top['served']:.0f} tokens/s) "
                            if top
                            else "no rate tried "
                        )
                        + f"within p90 TTFT <= {t_ttft * 1e3:g} ms and p90 TBT <= {t_tbt * 1e3:g} ms"
                    )
    print("\nThroughput at the latency target (highest offered rate that meets both):")
    print("\n".join(best))


def part_lamina_context(args) -> None:
    """lamina (1 compute + W-1 memory workers) vs one process at several context lengths: bytes
    per token on the link against the formula, TBT, and TTFT against the link model's time for
    the prompt's messages (per layer q, k, v of T tokens out, then T tokens of attention back,
    each message its transmission plus a latency, one after the other)."""
    new = args.new_tokens
    print(f"command: `python benchmarks/inference.py {shlex.join(sys.argv[1:])}`\n")
    print(
        "| model | link | workers | context (prompt tokens) | single TBT p50 ms | lamina TBT p50 ms "
        "| single TTFT ms | lamina TTFT ms | predicted comm in TTFT ms "
        "| bytes per token, measured | formula (H + 2K) D 4 N + H D 4 N "
        "| KV cache kept on the memory workers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        c = PRESETS[model]
        per_token = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * 4 * c.n_layers + (
            c.n_heads * c.head_dim * 4 * c.n_layers
        )
        for T in map(int, args.contexts.split(",")):
            prompt = (PROMPT * (T // len(PROMPT) + 1))[:T]
            base = GenerateConfig(model=model, prompt=prompt, max_new_tokens=new, quiet=True)
            (one,) = generate(base)
            for spec in args.links.split(","):
                for w in map(int, args.workers.split(",")):
                    cfg = GenerateConfig(
                        **{**base.to_dict(), "workers": w, "link": spec, "parallel": "lamina"}
                    )
                    (r,) = generate(cfg)
                    fed = T + new - 1  # the prompt's tokens, then new - 1 one at a time
                    measured = sum(r["bytes_sent_by_worker"]) / fed
                    cache = 2 * c.n_layers * c.n_kv_heads * c.head_dim * (T + new) * 4
                    pred = predicted_lamina_prefill_comm(model, T, w, LinkSpec.parse(spec))
                    print(
                        f"| {model} | {spec} | {w} | {T} | {ms(one['tbt_p50_s'])} | "
                        f"{ms(r['tbt_p50_s'])} | {ms(one['ttft_s'])} | {ms(r['ttft_s'])} | "
                        f"{ms(pred)} | {measured:,.0f} | {per_token:,} | {cache:,} B |"
                        + ("" if r["tokens"] == one["tokens"] else " (tokens differ!)")
                    )
                    sys.stdout.flush()


PARTS = {
    "pp-requests": part_pp_requests,
    "stream": part_stream,
    "lamina-context": part_lamina_context,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--part",
        default="modes",
        choices=["modes", "pp-requests", "stream", "lamina-context"],
        help="modes: one request, every split (the table above); pp-requests: several requests "
        "through pp, one at a time vs micro-batches; stream: splitwise vs colocated under a "
        "Poisson stream; lamina-context: lamina's bytes per token and TBT vs context length",
    )
    p.add_argument("--models", default="1m,10m")
    p.add_argument("--workers", default="2,4")
    p.add_argument("--links", default="300mbit:5ms,1gbit:1ms")
    p.add_argument(
        "--new-tokens", type=int, default=16
    )  # prompt + new tokens <= 128 (the budget's cache)
    p.add_argument("--requests", type=int, default=8, help="pp-requests, stream: requests")
    p.add_argument("--rates", default="25,50,100,200", help="stream: arrival rates, requests/s")
    p.add_argument("--targets", default="150,10", help="stream: p90 TTFT and p90 TBT targets, ms")
    p.add_argument("--contexts", default="64,256,1024", help="lamina-context: prompt tokens")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.part != "modes":
        PARTS[args.part](args)
        return
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
