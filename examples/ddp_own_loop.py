"""lowband.DDP inside your own PyTorch loop, with an emulated 100 Mbit/s, 20 ms link.

    torchrun --nproc-per-node 2 examples/ddp_own_loop.py

Every byte the algorithm sends is counted by `comm.stats`; the link stretches each collective to
what it would take on that network.
"""

import time

import torch
import torch.distributed as dist

import lowband
from lowband.models import build_model

torch.set_num_threads(1)
dist.init_process_group("gloo")
comm = lowband.Comm(dist.group.WORLD, lowband.LinkSpec.parse("100mbit:20ms"))
model = build_model("1m", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
gen = torch.Generator().manual_seed(comm.rank)  # each worker its own data

t0 = time.perf_counter()
with lowband.DDP(model, opt, comm):
    for _ in range(20):
        tokens = torch.randint(0, 256, (8, 65), generator=gen)
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()  # DDP averages the gradients first (an optimizer pre-step hook)
        opt.zero_grad()
if comm.rank == 0:
    s = comm.stats
    print(
        f"20 steps in {time.perf_counter() - t0:.1f}s; sent {s.bytes_sent / 1e6:.1f} MB, blocked on comm {s.seconds:.1f}s"
    )
    print(s.by_op())
dist.destroy_process_group()
