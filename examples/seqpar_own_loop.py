"""Long sequences split over the ranks: the Llama-style model with zigzag ring attention, learning
on the standard-library corpus.

    torchrun --nproc-per-node 2 examples/seqpar_own_loop.py [--steps 50]

Every rank holds 1/W of each 1024-token sequence (--seq-len) (chunks r and 2W-1-r); the model's attention runs
over all of them. DDP then averages the gradients: each rank's are its share of the full
gradient. Swap "ring" for "tokenring" or "ulysses" to compare the bytes they send. Rank 0 prints
the eval loss on held-out sequences before and after, and the bytes of each operation.
"""

import argparse
import time

import torch
import torch.distributed as dist

import lowband
from lowband.comm.accounting import format_bytes
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.models import build_model
from lowband.seqpar.train import SeqParallel

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=50)
p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (a multiple of 4W)")
args = p.parse_args()
torch.set_num_threads(1)
dist.init_process_group("gloo")
comm = lowband.Comm(dist.group.WORLD)
sp = SeqParallel("ring", comm, dp_rank=0, dp_size=1)  # one cp group of every rank, no dp

corpus = load_corpus("stdlib")
train, held_out = split_eval(corpus)
# The same sequences on every rank (one data-parallel group); each rank computes its chunks.
sampler = ShardSampler(train, rank=0, world_size=1, batch_size=2, seq_len=args.seq_len, seed=0)
evals = eval_batches(held_out, batch_size=2, seq_len=args.seq_len, num_batches=1)
model = build_model("1m", vocab_size=corpus.vocab_size, seed=0, attn_fn=sp.attn_fn)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


@torch.no_grad()
def evaluate() -> float:  # every rank takes part: attention spans all of them
    return sum(sp.loss(model, x.long(), y.long()).item() for x, y in evals) / len(evals)


start, t0 = evaluate(), time.perf_counter()
with lowband.DDP(model, opt, comm):
    for step in range(1, args.steps + 1):
        x, y = sampler.batch(step)
        loss = sp.loss(model, x.long(), y.long())  # this rank's shard, mean over all
        loss.backward()
        opt.step()
        opt.zero_grad()
end = evaluate()
if comm.rank == 0:
    print(f"ring eval loss {start:.3f} -> {end:.3f}   {args.steps} steps of 2 x {args.seq_len} tokens in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    print({op: format_bytes(v["bytes_sent"]) for op, v in comm.stats.by_op().items()})
dist.barrier()  # Gloo aborts if a peer tears down while another is still in a collective
dist.destroy_process_group()
