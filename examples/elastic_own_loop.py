"""Fault-tolerant DiLoCo in your own loop, on torchft: workers may die and rejoin mid-run.

Start a Lighthouse, then one process per worker (each is its own torchft replica group):

    torchft_lighthouse --min_replicas 1 --quorum_tick_ms 100 --join_timeout_ms 10000 &
    python examples/elastic_own_loop.py --replica 0 --lighthouse http://localhost:29510 &
    python examples/elastic_own_loop.py --replica 1 --lighthouse http://localhost:29510 &
    # kill one; start it again with --join: it heals from a live peer and goes on
    python examples/elastic_own_loop.py --replica 1 --lighthouse http://localhost:29510 --join

(`lowband.start_lighthouse(min_workers)` starts one inside a Python process instead.) The loop
is an ordinary PyTorch loop over the standard-library corpus; what lowband adds is the sync
group (a quorum per synchronisation, commit or roll back, bit-parity after each commit) and
`register_state`: what a newcomer downloads from a live peer. torchft's names: replica_id =
replica_{--replica}, lighthouse_addr = --lighthouse, min_replica_size = --min-replicas.
"""

import argparse

import torch

import lowband
from lowband.data import ShardSampler, load_corpus, split_eval
from lowband.models import build_model

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--replica", type=int, required=True, help="this worker's index (0, 1, ...)")
p.add_argument("--lighthouse", required=True, help="the Lighthouse's address, http://HOST:PORT")
p.add_argument("--min-replicas", type=int, default=1, help="fewest workers a sync may commit with")
p.add_argument("--join", action="store_true", help="a restarted or new worker: heal first")
p.add_argument("--steps", type=int, default=200)
p.add_argument("--sync-every", type=int, default=20)
p.add_argument("--shards", type=int, default=2, help="data shards (one per worker)")
args = p.parse_args()
torch.set_num_threads(1)

tokens, _ = split_eval(load_corpus("stdlib"))
sampler = ShardSampler(tokens, rank=args.replica % args.shards, world_size=args.shards,
                       batch_size=8, seq_len=64, seed=0)  # fmt: skip
model = build_model("1m", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

group = lowband.ElasticGroup(
    index=args.replica, lighthouse=args.lighthouse, min_workers=args.min_replicas,
    joining=args.join,
)  # fmt: skip
algo = lowband.DiLoCo(model, opt, group, sync_every=args.sync_every)
position = {"step": 0}


def state_dict() -> dict:  # what a newcomer receives from this worker
    return {"model": model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict(),
            "step": position["step"]}  # fmt: skip


def load_state_dict(state: dict) -> None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    algo.load_state_dict(state["algo"])
    position["step"] = state["step"]


group.register_state(state_dict, load_state_dict)
if args.join:
    algo.join()  # heal from a live peer (model, optimizer, outer state, step), then sync with it
    print(f"replica {args.replica} healed at step {position['step']}", flush=True)

while position["step"] < args.steps:
    position["step"] += 1
    x, y = sampler.batch(position["step"])
    loss = model.loss(x.long(), y.long())
    loss.backward()
    opt.step()
    opt.zero_grad()
    algo.step()  # every --sync-every steps: a quorum, the outer step, commit or roll back
    if position["step"] % 10 == 0:
        print(f"replica {args.replica} step {position['step']} loss {loss.item():.3f} "
              f"outer {algo.outer_steps} committed {group.step}", flush=True)  # fmt: skip

digest = lowband.fault.parity.state_digest([g for f in algo.global_params for g in f])
print(f"replica {args.replica} done: global parameters {digest:016x}", flush=True)
group.shutdown()
