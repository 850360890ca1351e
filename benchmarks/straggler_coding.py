"""Question: how much faster is a DDP step with gradient coding than waiting for every worker, when
k of 8 workers are slow every step, and is the gradient the same?

    python benchmarks/straggler_coding.py --append

8 ranks as threads of one process (lowband.testing.run_ranks, one Gloo group each), a tiny model
on the stdlib corpus with the samplers `lowband train` uses, the real algorithm classes:
  - wait for all: DDP with a StragglerInjector: the k slow ranks sleep --delay before the
    all-reduce, and the all-reduce waits for them (what `--slow-workers k --straggler-delay D`
    does without --stragglers);
  - coded s: CodedDDP (`--stragglers s`): every rank computes s + 1 parts, rank 0 decodes from the
    first 8 - s arrivals; a slow rank is late by --delay unless rank 0's result comes first.
The same seeded injector picks the same k slow ranks per step in every mode. The figure is rank
0's median step time (data, forward/backward of its parts, synchronisation, optimizer step) over
the steps after the first, and the largest difference between each mode's synchronised gradient
and the wait-for-all run's at the same step (same start, same data, SGD).
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

from lowband.algorithms import DDP, CodedDDP  # noqa: E402
from lowband.coding import StragglerInjector, cyclic_mds, fractional_repetition  # noqa: E402
from lowband.data import ShardSampler, load_corpus, split_eval  # noqa: E402
from lowband.models import ModelConfig, build_model  # noqa: E402
from lowband.testing import run_ranks  # noqa: E402

TINY = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=256)


def worker(comm, tokens, s: int, k: int, delay: float, steps: int, batch: int, seq: int):
    torch.set_num_threads(1)
    n = comm.size
    model = build_model(TINY, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    injector = None
    if k > 0:
        injector = StragglerInjector(n, p=1.0, delay_s=delay, max_stragglers=k, seed=0)
    if s == 0:
        algo = DDP(model, opt, comm, injector=injector)
    else:
        code = fractional_repetition(n, s) if n % (s + 1) == 0 else cyclic_mds(n, s)
        algo = CodedDDP(model, opt, comm, code=code, injector=injector)
    sampler = ShardSampler(
        tokens, rank=comm.rank, world_size=n, batch_size=batch, seq_len=seq, seed=0
    )
    data = algo.wrap_sampler(sampler)
    times, grads = [], []
    comm.barrier()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        model.loss(*data.batch(step)).backward()
        algo.sync_gradients()
        opt.step()
        times.append(time.perf_counter() - t0)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.zero_grad()
        algo.step()
    algo.close()
    comm.barrier()
    return times, grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--delays", default="0.1,0.3", help="seconds a slow worker is late")
    ap.add_argument("--codes", default="1,2", help="stragglers s tolerated by the coded runs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokens, _ = split_eval(load_corpus("stdlib"))
    n, codes = args.workers, [int(v) for v in args.codes.split(",")]
    max_k = max(codes)

    def measure(s, k, delay):
        out = run_ranks(n, worker, tokens, s, k, delay, args.steps, args.batch, args.seq)
        times, grads = out[0]
        return statistics.median(times[1:]), grads

    lines = [
        "| delay | slow workers k | wait for all (DDP) | "
        + " | ".join(f"coded s={s}" for s in codes)
        + " | "
        + " | ".join(f"speed-up s={s}" for s in codes)
        + " | max grad diff vs DDP |",
        "|---|---|---|" + "---|" * (2 * len(codes)) + "---|",
    ]
    ref_grads = None
    for delay in [float(v) for v in args.delays.split(",")]:
        for k in range(0, max_k + 1):
            base, g_base = measure(0, k, delay)
            if ref_grads is None:
                ref_grads = g_base
            coded = {s: measure(s, k, delay) for s in codes}
            scale = max(float(g.abs().max()) for g in ref_grads)
            diff = max(
                float((a - b).abs().max())
                for res in [g_base, *(c[1] for c in coded.values())]
                for a, b in zip(res, ref_grads)
            )
            cells = [f"{coded[s][0] * 1e3:.0f} ms" for s in codes]
            ratios = [f"{base / coded[s][0]:.2f}x" for s in codes]
            line = (
                f"| {delay:.1f} s | {k} | {base * 1e3:.0f} ms | "
                + " | ".join(cells)
                + " | "
                + " | ".join(ratios)
                + f" | {diff:.1e} (max abs grad {scale:.1e}) |"
            )
            lines.append(line)
            print(line, flush=True)
            if k == 0:  # same slow ranks in no run: every mode computes the same gradients
                assert diff <= 1e-5 * scale, diff
    table = "\n".join(lines)
    print(table)
    if args.append:
        append_results(
            f"Gradient coding vs waiting for all ({n} workers, k slow per step)",
            "python " + shlex.join(sys.argv),
            table,
        )


if __name__ == "__main__":
    main()
