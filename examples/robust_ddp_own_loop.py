"""lowband.DDP with a Byzantine-robust rule instead of the average, inside your own loop, next
to a clean baseline, on the standard-library corpus.

    torchrun --nproc-per-node 3 examples/robust_ddp_own_loop.py [--steps 100]

Three runs of the same loop, from the same seed on the same batches:
  clean         the average, nobody attacks (the baseline);
  ipm vs mean   the last rank plays an IPM attacker (it sends -2 x the honest mean: Xie et al.
                2020), and the average takes it in: with 1 attacker of 3 the update is zero and
                nothing is learned;
  ipm vs trimmed-mean   the same attacker against the coordinate-wise trimmed mean with f = 1
                (needs n > 2f workers): it learns about as the clean run does.
In all three the gradients are all-gathered (8-bit) for the rule, so the bytes are the same;
the attack is simulated after the all-gather, the same way on every rank. `lowband train --aggregate trimmed-mean
--byzantine-tolerance 1 --bits 8 --attack ipm --attackers 1 --workers 3` runs the last one.
"""

import argparse

import torch
import torch.distributed as dist

import lowband
from lowband.comm import get_codec
from lowband.comm.accounting import format_bytes
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.models import build_model
from lowband.robust import RobustReducer

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=100)
args = p.parse_args()
torch.set_num_threads(1)
dist.init_process_group("gloo")

corpus = load_corpus("stdlib")
train, held_out = split_eval(corpus)
evals = eval_batches(held_out, batch_size=8, seq_len=64, num_batches=4)
RUNS = {  # name: (rule, f, attack)
    "clean": ("mean", 0, None),
    "ipm vs mean": ("mean", 0, "ipm"),
    "ipm vs trimmed-mean": ("trimmed-mean", 1, "ipm"),
}


@torch.no_grad()
def evaluate(model) -> float:
    return sum(model.loss(x.long(), y.long()).item() for x, y in evals) / len(evals)


for name, (rule, f, attack) in RUNS.items():
    comm = lowband.Comm(dist.group.WORLD)
    model = build_model("1m", vocab_size=corpus.vocab_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sampler = ShardSampler(train, rank=comm.rank, world_size=comm.size, batch_size=8, seq_len=64,
                           seed=0)  # fmt: skip
    # Every run all-gathers 8-bit gradients, so the runs differ only in the rule and the attack.
    reducer = RobustReducer(comm, rule, f=f, codec=get_codec(8), attack=attack,
                            attackers=[comm.size - 1] if attack else [])  # fmt: skip
    start = evaluate(model)
    with lowband.DDP(model, opt, comm, reducer=reducer):
        for step in range(1, args.steps + 1):
            x, y = sampler.batch(step)
            loss = model.loss(x.long(), y.long())
            loss.backward()
            opt.step()  # the (robust) aggregation runs first (an optimizer pre-step hook)
            opt.zero_grad()
    if comm.rank == 0:
        print(f"{name:<20} eval loss {start:.3f} -> {evaluate(model):.3f}   "
              f"sent {format_bytes(comm.stats.bytes_sent)} per worker", flush=True)  # fmt: skip
dist.barrier()  # Gloo aborts if a peer tears down while another is still in a collective
dist.destroy_process_group()
