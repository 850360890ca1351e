"""Streaming DiLoCo in your own loop: 4 fragments, 4-bit outer gradients, overlapped syncs (TAU = 8 steps).

    torchrun --nproc-per-node 2 examples/streaming_diloco_own_loop.py

The inner loop is an ordinary PyTorch loop; `algo.step()` after the optimizer's step does the
rest: every H/P steps one fragment's pseudo-gradient is reduced in the background (quantized to
4 bits on the wire) and lands TAU steps later.
"""

import torch
import torch.distributed as dist

import lowband
from lowband.models import build_model

torch.set_num_threads(1)
dist.init_process_group("gloo")
comm = lowband.Comm(dist.group.WORLD, lowband.LinkSpec.parse("100mbit:50ms"))
model = build_model("1m", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
algo = lowband.StreamingDiLoCo(model, opt, comm, sync_every=40, fragments=4, overlap=8, bits=4)
gen = torch.Generator().manual_seed(comm.rank)

for _ in range(120):
    tokens = torch.randint(0, 256, (8, 65), generator=gen)
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad()
    algo.step()  # outer machinery: starts, finishes and mixes fragment syncs on schedule
algo.close()
if comm.rank == 0:
    print(
        f"outer steps {algo.outer_steps}, sent {comm.stats.bytes_sent / 1e6:.2f} MB, "
        f"exposed comm {comm.stats.seconds:.2f}s, overlapped {comm.stats.background_seconds:.2f}s"
    )
dist.destroy_process_group()
