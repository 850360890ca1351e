"""lowband.DDP with a Byzantine-robust rule instead of the average, inside your own loop.

    torchrun --nproc-per-node 4 examples/robust_ddp_own_loop.py

Every step the gradients are all-gathered (8-bit here) and combined by the trimmed mean with
f = 1; the last rank plays an IPM attacker (the attack is simulated after the all-gather, the same
way on every rank). `lowband train --aggregate trimmed-mean --byzantine-tolerance 1 --bits 8
--attack ipm --attackers 1` does the same.
"""

import time

import torch
import torch.distributed as dist

import lowband
from lowband.comm import get_codec
from lowband.models import build_model
from lowband.robust import RobustReducer

torch.set_num_threads(1)
dist.init_process_group("gloo")
comm = lowband.Comm(dist.group.WORLD)
model = build_model("1m", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
gen = torch.Generator().manual_seed(comm.rank)  # each worker its own data
reducer = RobustReducer(
    comm, "trimmed-mean", f=1, codec=get_codec(8), attack="ipm", attackers=[comm.size - 1]
)

t0 = time.perf_counter()
with lowband.DDP(model, opt, comm, reducer=reducer):
    for _ in range(10):
        tokens = torch.randint(0, 256, (8, 65), generator=gen)
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()  # the robust aggregation runs first (an optimizer pre-step hook)
        opt.zero_grad()
if comm.rank == 0:
    s = comm.stats
    print(
        f"10 steps in {time.perf_counter() - t0:.1f}s, loss {loss.item():.3f}; sent {s.bytes_sent / 1e6:.1f} MB"
    )
    print(s.by_op())
dist.destroy_process_group()
