"""Question: how much of the clean run's loss does each aggregator keep under each attack, and what
does the aggregation cost per round?

    python benchmarks/robust_table.py --append

Harness: 10 simulated workers in ONE process (no process group: the aggregation is what is
measured, not the all-gather). Every step, worker i computes its gradient on its own ShardSampler
shard of the stdlib corpus (the same sampler `lowband train` uses), the last f workers are the
attackers (the training convention, lowband/algorithms/robust.py), the update attacks replace
their rows with attack(honest rows) (lowband.robust.apply_attack) and label-flip trains them on
flipped targets (flip_labels); the rule (lowband.robust.get_aggregator with f) makes one gradient,
clipped to norm 1 and stepped by AdamW, exactly as `lowband train --aggregate RULE` does on every
rank. The figure is the final held-out loss divided by the clean run's (mean, no attack), and the
aggregator's wall time per round divided by the mean's, both from this one invocation.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results  # noqa: E402

from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval  # noqa: E402
from lowband.models import ModelConfig, build_model  # noqa: E402
from lowband.robust import apply_attack, flip_labels, get_aggregator, get_attack  # noqa: E402

TINY = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=256)
RULES = ["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geomed", "cc", "flag"]
ATTACKS = ["sign-flip", "ipm", "alie", "gaussian", "label-flip"]


def run(args, data, rule: str, attack: str | None, f: int) -> tuple[float, float]:
    """Final eval loss and median seconds per aggregation, for one (rule, attack, f): the last f
    workers attack; the rule tolerates f (the mean tolerates none, whatever f)."""
    torch.manual_seed(0)
    train, evals = data
    n = args.workers
    model = build_model(TINY, seed=args.seed)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    samplers = [
        ShardSampler(train, rank=r, world_size=n, batch_size=args.batch, seq_len=args.seq, seed=0)
        for r in range(n)
    ]
    agg = get_aggregator(rule, f=0 if rule == "mean" else f, n=n)
    bad = list(range(n - f, n)) if attack else []  # the last f ranks, as in lowband train
    update_attack = get_attack(attack) if attack and attack != "label-flip" else None
    gen = torch.Generator().manual_seed(1)
    times = []
    for step in range(1, args.steps + 1):
        rows = []
        for r in range(n):
            x, y = samplers[r].batch(step)
            if attack == "label-flip" and r in bad:
                y = flip_labels(y, TINY.vocab_size)
            opt.zero_grad(set_to_none=True)
            model.loss(x, y).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
        updates = torch.stack(rows)
        if update_attack is not None:
            updates = apply_attack(updates, bad, update_attack, gen)
        t0 = time.perf_counter()
        g = agg(updates)
        times.append(time.perf_counter() - t0)
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        loss = sum(float(model.loss(x, y)) for x, y in evals) / len(evals)
    return loss, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--fs", default="1,2,3")
    ap.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    corpus = load_corpus("stdlib")
    train, held = split_eval(corpus)
    data = (train, eval_batches(held, batch_size=8, seq_len=args.seq, num_batches=4))
    rules, attacks = args.rules.split(","), args.attacks.split(",")
    fs = [int(v) for v in args.fs.split(",")]
    t_start = time.perf_counter()

    clean, _ = run(args, data, "mean", None, 0)
    start = build_model(TINY, seed=args.seed)
    with torch.no_grad():
        init = sum(float(start.loss(x, y)) for x, y in data[1]) / len(data[1])
    print(f"initial eval loss {init:.4f}, clean (mean, no attack) {clean:.4f}", flush=True)
    no_attack, agg_s = {}, {}
    for rule in rules:  # f = 1 without attackers: what each rule costs when nobody attacks
        no_attack[rule], agg_s[rule] = run(args, data, rule, None, 1)
        print(f"{rule:>13} no attack: {no_attack[rule] / clean:.3f}  {agg_s[rule] * 1e3:.3f} ms")
    rel: dict[tuple[str, str, int], float | None] = {}
    for attack in attacks:
        for f in fs:
            for rule in rules:
                try:
                    get_aggregator(rule, f=f, n=args.workers)
                except Exception:  # noqa: BLE001 - precondition (bulyan needs n >= 4f + 3)
                    rel[rule, attack, f] = None
                    continue
                loss, _ = run(args, data, rule, attack, f)
                rel[rule, attack, f] = loss / clean
                print(f"{attack:>10} f={f} {rule:>13}: {loss / clean:.3f}", flush=True)
    minutes = (time.perf_counter() - t_start) / 60

    head = "| attack | f | " + " | ".join(rules) + " |\n|---|---|" + "---|" * len(rules) + "\n"
    rows = []
    for attack in attacks:
        for f in fs:
            cells = [
                "-" if rel[r, attack, f] is None else f"{rel[r, attack, f]:.3f}" for r in rules
            ]
            rows.append(f"| {attack} | {f} | " + " | ".join(cells) + " |")
    rows.append("| none | 0 | " + " | ".join(f"{no_attack[r] / clean:.3f}" for r in rules) + " |")
    rows.append(
        "| agg. time / mean's | | "
        + " | ".join(f"{agg_s[r] / agg_s['mean']:.0f}x" for r in rules)
        + " |"
    )
    rows.append(
        "| agg. ms / round | | " + " | ".join(f"{agg_s[r] * 1e3:.2f}" for r in rules) + " |"
    )
    table = head + "\n".join(rows)
    print(table)
    print(f"{minutes:.1f} min")
    if args.append:
        d = sum(p.numel() for p in build_model(TINY).parameters())
        append_results(
            f"Robust aggregators under attack ({args.workers} simulated workers, {d:,}-parameter "
            f"model, {args.steps} AdamW steps)",
            "python " + shlex.join(sys.argv),
            table,
            notes=f"Clean run (mean, no attack): eval loss {clean:.4f} (initial {init:.4f}). "
            f"Whole table: {minutes:.1f} min on one thread.",
        )


if __name__ == "__main__":
    main()
