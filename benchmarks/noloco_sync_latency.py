"""Question: how long does one NoLoCo sync take against an all-reduce, as the number of replicas grows?

    python benchmarks/noloco_sync_latency.py --append

Lightweight ranks (threads of one process, each with its own Gloo group, like lowband's tests)
with a tiny model, behind an emulated link (default 1gbit:100ms). For each world size it times,
on every rank, one outer sync of:
  - NoLoCo (group size 2): a point-to-point exchange inside the group, then the outer step;
  - DiLoCo: the pseudo-gradient all-reduce (all-to-all + all-gather, fp32) and the outer step;
  - a plain ring all-reduce of the same tensor (comm.all_reduce), for reference.
A barrier precedes every timed sync; the figure is the median over rounds of the slowest rank.
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

from lowband.algorithms import DiLoCo, NoLoCo  # noqa: E402
from lowband.comm import LinkSpec  # noqa: E402
from lowband.models import ModelConfig, build_model  # noqa: E402
from lowband.testing import run_ranks  # noqa: E402

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256)


def timed_syncs(comm, rounds: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    out: dict[str, list[float]] = {"noloco": [], "diloco": [], "all_reduce": []}
    model = build_model(TINY, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    noloco = NoLoCo(model, opt, comm, sync_every=1, group_size=2)
    diloco = DiLoCo(model, opt, comm, sync_every=1)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for _ in range(rounds):
        comm.barrier()
        t0 = time.perf_counter()
        noloco.step()  # sync_every=1: every step is one outer round
        out["noloco"].append(time.perf_counter() - t0)
        comm.barrier()
        t0 = time.perf_counter()
        diloco.step()
        out["diloco"].append(time.perf_counter() - t0)
        comm.barrier()
        t0 = time.perf_counter()
        comm.all_reduce(flat.clone())
        out["all_reduce"].append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="4,8,16")
    p.add_argument("--link", default="1gbit:100ms")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    link = LinkSpec.parse(args.link)
    params = build_model(TINY).num_params()
    table = (
        "| ranks | NoLoCo sync (s) | DiLoCo sync (s) | ring all-reduce (s) | all-reduce / NoLoCo |\n"
        "|---|---|---|---|---|\n"
    )
    for n in (int(x) for x in args.ranks.split(",")):
        per_rank = run_ranks(n, timed_syncs, args.rounds, link=link, timeout_s=600)
        med = {
            k: statistics.median(max(r[k][i] for r in per_rank) for i in range(args.rounds))
            for k in ("noloco", "diloco", "all_reduce")
        }
        line = (
            f"| {n} | {med['noloco']:.3f} | {med['diloco']:.3f} | {med['all_reduce']:.3f} | "
            f"{med['all_reduce'] / med['noloco']:.1f}x |"
        )
        print(line, flush=True)
        table += line + "\n"
    print(table)
    if args.append:
        append_results(
            f"NoLoCo sync latency vs all-reduce ({params:,}-parameter model, link {args.link})",
            "python benchmarks/noloco_sync_latency.py " + shlex.join(sys.argv[1:]),
            table,
            notes=(
                "Ranks are threads of one process with their own Gloo groups (lightweight ranks); "
                "the link model charges 2(n-1) latency hops to a ring all-reduce, n to DiLoCo's "
                "all-to-all + all-gather, and one exchange to a NoLoCo pair."
            ),
        )


if __name__ == "__main__":
    main()
