"""Your own loop, twice: DDP (gradients every step) against DiLoCo (an outer step every H), on the
standard-library corpus behind an emulated 100 Mbit/s, 20 ms link.

    torchrun --nproc-per-node 2 examples/diloco_vs_ddp_own_loop.py --out runs/own-loop
    lowband report runs/own-loop/ddp runs/own-loop/diloco

Both runs train lowband's 1m model from the same seed on the same batches; only the algorithm
differs. Rank 0 prints each one's eval loss before and after, the bytes it sent and the time it
was blocked on the link. With --out, lowband.RunWriter writes each run's folder (config, metrics,
summary), which `lowband report` plots beside any `lowband train` run.
"""

import argparse

import torch
import torch.distributed as dist

import lowband
from lowband.comm.accounting import format_bytes
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.models import build_model

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=200)
p.add_argument("--link", default="100mbit:20ms", help="the emulated link between the workers")
p.add_argument("--sync-every", type=int, default=50, help="DiLoCo's H")
p.add_argument("--out", help="write the two run folders here (for `lowband report`)")
args = p.parse_args()
torch.set_num_threads(1)
dist.init_process_group("gloo")

BATCH, LEN = 8, 64
corpus = load_corpus("stdlib")
train, held_out = split_eval(corpus)
evals = eval_batches(held_out, batch_size=BATCH, seq_len=LEN, num_batches=4)
ALGOS = {
    "ddp": lambda model, opt, comm: lowband.DDP(model, opt, comm),
    "diloco": lambda model, opt, comm: lowband.DiLoCo(
        model, opt, comm, sync_every=args.sync_every, outer_lr=0.7, outer_momentum=0.9
    ),
}


@torch.no_grad()
def evaluate(model) -> float:
    return sum(model.loss(x.long(), y.long()).item() for x, y in evals) / len(evals)


for name, make in ALGOS.items():
    comm = lowband.Comm(dist.group.WORLD, lowband.LinkSpec.parse(args.link))  # own counters
    model = build_model("1m", vocab_size=corpus.vocab_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sampler = ShardSampler(
        train, rank=comm.rank, world_size=comm.size, batch_size=BATCH, seq_len=LEN, seed=0
    )
    algo = make(model, opt, comm)
    run = None
    if args.out:
        run = lowband.RunWriter(f"{args.out}/{name}", comm, algo=algo, model=model,
                                corpus=corpus, tokens_per_step=BATCH * LEN * comm.size)  # fmt: skip
    start = evaluate(model)
    if run:
        run.log(0, eval_loss=start)
    with algo:  # DDP averages gradients before opt.step(); DiLoCo steps after it, every H
        for step in range(1, args.steps + 1):
            x, y = sampler.batch(step)
            loss = model.loss(x.long(), y.long())
            loss.backward()
            opt.step()
            opt.zero_grad()
            if run and step % 10 == 0 and step < args.steps:
                run.log(step, train_loss=loss.item())
    end = evaluate(model)
    if run:
        run.log(args.steps, train_loss=loss.item(), eval_loss=end)
        run.finish()
    if comm.rank == 0:
        s = comm.stats
        print(f"{name:<8} eval loss {start:.3f} -> {end:.3f}   sent {format_bytes(s.bytes_sent)} "
              f"per worker   blocked on the link {s.seconds:.1f} s", flush=True)  # fmt: skip
if args.out and dist.get_rank() == 0:
    print(f"lowband report {args.out}/ddp {args.out}/diloco")
dist.barrier()  # Gloo aborts if a peer tears down while another is still in a collective
dist.destroy_process_group()
