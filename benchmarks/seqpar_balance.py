"""Step time of a variable-length batch: balanced placement vs naive round-robin packing.

GPU (one process per GPU, any world size):
    torchrun --nproc-per-node 2 benchmarks/seqpar_balance.py --append
CPU smoke (2 Gloo processes started here, tiny sizes):
    python benchmarks/seqpar_balance.py --smoke

Lengths are drawn log-uniformly from [--min-len, --max-len] (seeded) until the batch would pass
--fill of the ranks' total capacity. lowband.seqpar.balance places them twice: balanced
(ByteScale-style) and naive (round-robin in arrival order, split only above the capacity).
A step runs, on every rank, what the placement gives it: per sequence, a causal attention
forward+backward (a zigzag ring over the sequence's group of ranks; the block kernel alone for
a single rank) and a token-wise linear forward+backward (the b*L part: two E x 4E matmuls).
The cost model a*L^2 + b*L is calibrated on the device first (one attention and one linear
pass at max_len/4 tokens: a CPU's math path computes the masked half of a causal block, a GPU's
fused kernel skips it, so FLOPs alone mislead); --flop-cost uses a = 3.5*H*D (causal attention
fwd+bwd per L^2), b = 48*E^2 instead. Step time = slowest rank; naive and balanced steps are
interleaved, --iters of each, and the median is reported.

Context-parallel items run in one global order (largest group first, then sequence index) that
every member follows, so groups never wait on each other in a cycle.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowband.comm import Comm  # noqa: E402
from lowband.seqpar import Layout, ring_attention  # noqa: E402
from lowband.seqpar.balance import balance  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-len", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=131072)
    p.add_argument("--capacity", type=int, default=131072, help="tokens per rank")
    p.add_argument("--fill", type=float, default=0.8, help="batch tokens / total capacity")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dim", type=int, default=4096, help="E of the token-wise linear part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--flop-cost",
        action="store_true",
        help="cost model from FLOPs (a = 3.5*H*D, b = 48*E^2) instead of timing one attention "
        "and one linear pass on this device",
    )
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default="seqpar_balance.jsonl")
    p.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="2 Gloo processes on CPU, tiny sizes")
    args = p.parse_args(argv)
    if args.smoke:
        args.min_len, args.max_len, args.capacity = 16, 256, 512
        args.heads, args.head_dim, args.dim, args.iters = 2, 16, 32, 2
    return args


def draw_lengths(args, world: int) -> list[int]:
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = math.log(args.min_len), math.log(args.max_len)
    budget, lengths = args.fill * world * args.capacity, []
    while True:
        n = int(math.exp(lo + (hi - lo) * torch.rand((), generator=g).item()))
        if sum(lengths) + n > budget:
            return lengths
        lengths.append(n)


class Runner:
    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.comms: dict[tuple[int, ...], Comm] = {}
        for d in (d for d in range(2, self.world + 1) if self.world % d == 0):
            for s in range(0, self.world, d):
                ranks = tuple(range(s, s + d))
                group = dist.new_group(list(ranks))  # every rank creates every group
                if self.rank in ranks:
                    self.comms[ranks] = Comm(group, device=device)
        E = args.dim
        self.w1 = torch.randn(E, 4 * E, device=device, dtype=self.dtype, requires_grad=True)
        self.w2 = torch.randn(4 * E, E, device=device, dtype=self.dtype, requires_grad=True)

    def items(self, groups: list[tuple[int, ...]], lengths: list[int]):
        """This rank's work, in the global order: (group, length, local tensors)."""
        order = sorted(range(len(lengths)), key=lambda i: (-len(groups[i]), i))
        a, out = self.args, []
        for i in order:
            g = groups[i]
            if self.rank not in g:
                continue
            d = len(g)
            lay = Layout("zigzag", d)
            L = lay.padded(lengths[i]) // d if d > 1 else lengths[i]
            gen = torch.Generator(device=self.device).manual_seed(i)

            def rnd(*shape, gen=gen):
                return torch.randn(*shape, generator=gen, device=self.device, dtype=self.dtype)

            qkv = [rnd(1, a.heads, L, a.head_dim).requires_grad_() for _ in range(3)]
            out.append((g, lengths[i], qkv, rnd(1, a.heads, L, a.head_dim), rnd(L, a.dim)))
        return out

    def step(self, work) -> None:
        for g, n, (q, k, v), do, x in work:
            if len(g) > 1:
                out = ring_attention(q, k, v, self.comms[g], seq_len=n)
            else:  # one rank: the same block kernels, no transfers
                out = ring_attention(q, k, v, Comm(None), layout="contiguous")
            out.backward(do)
            y = (x.requires_grad_() @ self.w1).relu() @ self.w2
            y.backward(torch.ones_like(y))
            for t in (q, k, v, x, self.w1, self.w2):
                t.grad = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dist.all_reduce(torch.zeros(1, device=self.device))

    def one_step(self, work) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.step(work)
        self.sync()
        t = torch.tensor([time.perf_counter() - t0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def compare(self, placements: dict, lengths) -> dict[str, float]:
        """Median step time per placement, steps interleaved so drift hits both alike."""
        works = {k: self.items(groups, lengths) for k, groups in placements.items()}
        times: dict[str, list[float]] = {k: [] for k in works}
        for w in works.values():
            self.one_step(w)  # warm-up
        for _ in range(self.args.iters):
            for k, w in works.items():
                times[k].append(self.one_step(w))
        return {k: statistics.median(v) for k, v in times.items()}

    def calibrate(self) -> tuple[float, float]:
        """a, b of the cost model from this device: one attention and one linear pass at L0."""
        L0 = max(64, self.args.max_len // 4)
        g = (self.rank,)
        lin = self.items([g], [L0])
        t_full = statistics.median(self.one_step(lin) for _ in range(3))
        x = lin[0][4]
        self.sync()
        t0 = time.perf_counter()
        for _ in range(3):
            y = (x.requires_grad_() @ self.w1).relu() @ self.w2
            y.backward(torch.ones_like(y))
        self.sync()
        t_lin = self.max_over_ranks((time.perf_counter() - t0) / 3)
        t_attn = max(t_full - t_lin, 1e-9)
        return t_attn / L0**2, t_lin / L0

    def max_over_ranks(self, x: float) -> float:
        t = torch.tensor([x], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def run(args, device) -> tuple[list[dict], str]:
    r = Runner(args, device)
    lengths = draw_lengths(args, r.world)
    if args.flop_cost:
        a_cost, b_cost = 7.0 * args.heads * args.head_dim / 2, 48.0 * args.dim**2
    else:
        a_cost, b_cost = r.calibrate()
    rep = balance(lengths, r.world, args.capacity, a=a_cost, b=b_cost)
    placements = {"naive": rep.naive, "balanced": rep.balanced}
    runnable = {k: p.groups for k, p in placements.items() if max(p.tokens) <= args.capacity}
    times = r.compare(runnable, lengths)
    rows = []
    for name, pl in placements.items():
        row = {
            "placement": name,
            "world": r.world,
            "sequences": len(lengths),
            "tokens": sum(lengths),
            "max_len": max(lengths),
            "capacity": args.capacity,
            "cost_a": a_cost,
            "cost_b": b_cost,
            "model_max_cost": pl.max_load,
            "model_imbalance": pl.imbalance,
            "max_tokens_per_rank": max(pl.tokens),
            "groups": sorted({len(g) for g in pl.groups}),
        }
        if name in times:
            row["step_seconds"] = times[name]
        else:
            row["error"] = "placement exceeds the capacity on some rank: not run"
        rows.append(row)
        if r.rank == 0:
            print(json.dumps(row), flush=True)
    naive = rows[0]
    lines = [
        "| placement | sequences | tokens | max tokens/rank | group sizes | modelled imbalance (max/mean) | step s (median) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ok = "step_seconds" in row and "step_seconds" in naive
        step = f"{row['step_seconds']:.3f}" if "step_seconds" in row else row["error"]
        speed = f"{naive['step_seconds'] / row['step_seconds']:.2f}x" if ok else "-"
        sizes = ",".join(map(str, row["groups"]))
        lines.append(
            f"| {row['placement']} | {row['sequences']} | {row['tokens']:,} | "
            f"{row['max_tokens_per_rank']:,} | {sizes} | {row['model_imbalance']:.2f} | {step} | {speed} |"
        )
    cost = (
        f"cost a={a_cost:.3g} s/token^2, b={b_cost:.3g} s/token"
        if not args.flop_cost
        else (f"cost a={a_cost:.3g}, b={b_cost:.3g} FLOPs")
    )
    return rows, "\n".join(lines) + f"\n\nlengths: {lengths}; {cost}; {rep.summary()}"


def worker(rank: int, world: int, port: int, args) -> None:
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    use_cuda = torch.cuda.is_available() and not args.smoke
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=args.timeout),
        **({"device_id": device} if use_cuda else {}),
    )
    try:
        rows, table = run(args, device)
        if dist.get_rank() == 0:
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(table)
            if args.append:
                from _common import append_results

                append_results(
                    f"Variable-length balancing, {dist.get_world_size()} ranks",
                    f"torchrun --nproc-per-node {dist.get_world_size()} "
                    "benchmarks/seqpar_balance.py " + " ".join(sys.argv[1:]),
                    table,
                )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    from _common import torchrun_or_smoke

    return torchrun_or_smoke(worker, parse(argv))


if __name__ == "__main__":
    sys.exit(main())
