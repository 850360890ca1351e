"""One long sequence split over the ranks: the Llama-style model with zigzag ring attention.

    torchrun --nproc-per-node 2 examples/seqpar_own_loop.py

Every rank holds 1/W of each sequence (chunks r and 2W-1-r); the model's attention runs over
all of them. DDP then averages the gradients: each rank's are its share of the full gradient.
Swap "ring" for "tokenring" or "ulysses" to compare the bytes they send.
"""

import time

import torch
import torch.distributed as dist

import lowband
from lowband.models import build_model
from lowband.seqpar.train import SeqParallel

torch.set_num_threads(1)
dist.init_process_group("gloo")
comm = lowband.Comm(dist.group.WORLD)
sp = SeqParallel("ring", comm, dp_rank=0, dp_size=1)  # one cp group of every rank, no dp
model = build_model("1m", seed=0, attn_fn=sp.attn_fn)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
gen = torch.Generator().manual_seed(0)  # the same sequences on every rank

t0 = time.perf_counter()
with lowband.DDP(model, opt, comm):
    for _ in range(10):
        tokens = torch.randint(0, 256, (2, 1025), generator=gen)
        loss = sp.loss(model, tokens[:, :-1], tokens[:, 1:])  # this rank's shard, mean over all
        loss.backward()
        opt.step()
        opt.zero_grad()
if comm.rank == 0:
    s = comm.stats
    print(f"10 steps of 2 x 1024 tokens in {time.perf_counter() - t0:.1f}s, loss {loss.item():.3f}")
    print({op: f"{v['bytes_sent'] / 1e6:.2f} MB" for op, v in s.by_op().items()})
dist.destroy_process_group()
