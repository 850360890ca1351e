"""One torchft DiLoCo replica group (one process, one rank) for benchmarks/vs_torchft.py.

Builds exactly what `lowband train --algo diloco` builds on one worker (lowband's corpus, eval
split, ShardSampler, "1m" model, AdamW, warmup + cosine LambdaLR, grad clip) and wraps the loop
with torchft's `Manager` + `DiLoCo` instead of lowband's algorithm:

    python benchmarks/_torchft_worker.py --replica I --workers N --lighthouse http://host:port \
        --out DIR [--steps 300 --sync-every 50 ...]

The Lighthouse runs in its own process, started by vs_torchft.py with

    python benchmarks/_torchft_worker.py lighthouse --min-replicas N

which prints the Lighthouse's address on stdout and serves until its stdin closes (its Rust
logging goes to stderr, which vs_torchft.py sends to a log file). Every replica group
here is a single process (group rank 0, group world size 1) that hosts its own TCPStore, so the
cross-replica process group that torchft builds at each new quorum has N ranks, one per worker.

Bytes: torchft's process group is wrapped (`CountingGloo`) so every collective it issues is logged
with its tensor sizes; the bytes are then counted with lowband's own accounting model
(lowband.comm.accounting: ring all-reduce, 2(n-1)/n of the tensor per rank), the same model that
counts lowband's bytes. The Lighthouse/Manager gRPC control messages (quorum, should_commit,
heartbeats) are not counted (a few hundred bytes each, on the control plane).

Writes DIR/torchft_rank{I}.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from lowband.comm import accounting
from lowband.config import TrainConfig
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.models import build_model
from lowband.train.loop import evaluate, lr_lambda


def _counting_gloo():
    """A torchft ProcessGroupGloo that logs (op, numel, itemsize, rank, size) of every collective."""
    from torchft.process_group import ProcessGroupGloo

    class CountingGloo(ProcessGroupGloo):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.log: list[tuple[str, int, int, int, int]] = []
            self.configures = 0

        def configure(self, *a, **kw) -> None:
            self.configures += 1
            super().configure(*a, **kw)

        def _note(self, op: str, tensors) -> None:
            pg = self.parent  # the Gloo group of the current quorum
            for t in tensors:
                self.log.append((op, t.numel(), t.element_size(), pg.rank(), pg.size()))

        def allreduce(self, tensors, opts):
            self._note("allreduce", tensors)
            return super().allreduce(tensors, opts)

        def allreduce_coalesced(self, tensors, opts):
            self._note("allreduce_coalesced", tensors)
            return super().allreduce_coalesced(tensors, opts)

        def broadcast(self, tensor_list, opts):
            self._note("broadcast", tensor_list)
            return super().broadcast(tensor_list, opts)

        def allgather(self, output_tensors, input_tensor, opts):
            self._note("allgather", input_tensor)
            return super().allgather(output_tensors, input_tensor, opts)

        def alltoall_base(self, output_buffer, input_buffer, *a, **kw):
            self._note("alltoall_base", [input_buffer])
            return super().alltoall_base(output_buffer, input_buffer, *a, **kw)

        def send(self, tensors, dst_rank, tag):
            self._note("send", tensors)
            return super().send(tensors, dst_rank, tag)

        def recv(self, tensors, src_rank, tag):
            self._note("recv", tensors)
            return super().recv(tensors, src_rank, tag)

    return CountingGloo


def bytes_sent(log: list[tuple[str, int, int, int, int]]) -> tuple[int, dict[str, int]]:
    """Bytes this rank sent for the logged collectives, under lowband's accounting model."""
    by_op: dict[str, int] = {}
    for op, numel, itemsize, rank, n in log:
        if op in ("allreduce", "allreduce_coalesced"):
            b = accounting.all_reduce_traffic(numel, itemsize, rank, n).sent
        elif op == "broadcast":
            b = accounting.broadcast_traffic(numel, itemsize, rank, 0, n).sent
        elif op == "allgather":
            b = accounting.all_gather_traffic(numel, itemsize, rank, n).sent
        elif op == "alltoall_base":
            b = accounting.all_to_all_traffic(numel, itemsize, rank, n).sent
        elif op == "send":
            b = numel * itemsize
        else:
            b = 0
        by_op[op] = by_op.get(op, 0) + b
    return sum(by_op.values()), by_op


def serve_lighthouse(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="run torchft's Lighthouse until stdin closes")
    p.add_argument("--min-replicas", type=int, required=True)
    p.add_argument("--join-timeout-ms", type=int, default=60_000)
    args = p.parse_args(argv)
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(
        bind="[::]:0", min_replicas=args.min_replicas, join_timeout_ms=args.join_timeout_ms
    )
    print(lighthouse.address(), flush=True)
    sys.stdin.read()  # the parent closes our stdin (or dies) when the run is over
    lighthouse.shutdown()


def _time_calls(obj, name: str, key: str, spent: dict[str, float]) -> None:
    """Replace obj.name by a wrapper that adds the seconds of every call to spent[key]."""
    fn = getattr(obj, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, timed)


def main() -> None:
    if sys.argv[1:2] == ["lighthouse"]:
        serve_lighthouse(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description="one torchft DiLoCo replica (see module docstring)")
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="1m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--init-sync",
        action="store_true",
        help="torchft's default init_sync=True (heal every replica but one from it at step 0)",
    )
    args = p.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager

    torch.set_num_threads(args.threads)
    # The same TrainConfig as `lowband train` gets, so lr, warmup, schedule, clip, wd are its own.
    cfg = TrainConfig(
        algo="diloco", model=args.model, seed=args.seed, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, workers=args.workers,
        eval_every=args.eval_every, eval_batches=args.eval_batches, device="cpu",
        options=dict(
            sync_every=args.sync_every, outer_lr=args.outer_lr,
            outer_momentum=args.outer_momentum,
        ),
    )  # fmt: skip
    opts = cfg.options
    i, n, steps = args.replica, args.workers, args.steps
    device = torch.device("cpu")

    corpus = load_corpus(cfg.data)
    train_tokens, eval_tokens = split_eval(corpus)
    model = build_model(cfg.model, vocab_size=corpus.vocab_size, seed=cfg.seed, device=device)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.resolved_lr(),
        betas=(0.9, 0.95),
        weight_decay=cfg.weight_decay,
        foreach=False,  # what lowband's loop passes on CPU
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    outer_opt = torch.optim.SGD(
        model.parameters(), lr=opts["outer_lr"], momentum=opts["outer_momentum"], nesterov=True
    )
    sampler = ShardSampler(
        train_tokens, rank=i, world_size=n, batch_size=cfg.batch_size,
        seq_len=cfg.seq_len, seed=cfg.seed,
    )  # fmt: skip
    evals = eval_batches(
        eval_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_batches=cfg.eval_batches
    )

    # One replica group = this process. Its TCPStore is where the quorum's primary hosts the
    # rendezvous of the cross-replica Gloo group (store_address in the quorum result).
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)

    def state_dict():
        return {"model": model.state_dict(), "inner_optim": opt.state_dict()}

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["inner_optim"])

    CountingGloo = _counting_gloo()
    pg = CountingGloo(timeout=datetime.timedelta(seconds=120))
    t_setup = time.perf_counter()
    manager = Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=n,
        use_async_quorum=False,  # DiLoCo requires it
        timeout=datetime.timedelta(seconds=120),
        quorum_timeout=datetime.timedelta(seconds=600),
        connect_timeout=datetime.timedelta(seconds=60),
        rank=0,
        world_size=1,
        store_addr="localhost",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"replica_{i}",
        hostname="localhost",
        init_sync=args.init_sync,  # identical seeded init everywhere: torchft's docs say False
    )
    manager_setup_s = time.perf_counter() - t_setup

    records: list[dict] = []
    evals_out: dict[int, float] = {}
    t_start = time.perf_counter()
    with DiLoCo(
        manager,
        [model],
        opt,
        outer_opt,
        sync_every=opts["sync_every"],
        backup_device=device,
        pin_memory=False,
    ) as diloco:
        # Where an outer step's time goes: wrap the calls torchft makes at a sync.
        spent: dict[str, float] = {}
        _time_calls(manager, "start_quorum", "quorum", spent)  # incl. Gloo group set-up (first)
        _time_calls(manager, "should_commit", "should_commit", spent)
        _time_calls(outer_opt, "step", "outer_opt_step", spent)
        for frag in diloco._fragments:
            _time_calls(frag, "prepare_sync", "prepare_sync", spent)  # pseudo-grads, issue
            _time_calls(frag, "perform_sync", "perform_sync", spent)  # wait, commit, outer step
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            x, y = sampler.batch(step)
            loss = model.loss(x, y)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()  # torchft's post-hook runs the outer step every sync_every steps
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_value = loss.item()
            dt = time.perf_counter() - t0
            rec = {
                "step": step,
                "train_loss": loss_value,
                "step_time": dt,
                "manager_step": manager.current_step(),
                "wall_time": time.perf_counter() - t_start,
            }
            if spent:
                rec["sync_breakdown"] = dict(spent)
                spent.clear()
            if step == steps or step % cfg.eval_every == 0:
                evals_out[step] = evaluate(model, evals, device, nullcontext)
                rec["eval_loss"] = evals_out[step]
            records.append(rec)
    wall = time.perf_counter() - t_start
    sent, by_op = bytes_sent(pg.log)
    calls: dict[str, int] = {}
    for op, *_ in pg.log:
        calls[op] = calls.get(op, 0) + 1
    out = {
        "replica": i,
        "workers": n,
        "records": records,
        "evals": evals_out,
        "wall_time": wall,
        "manager_setup_s": manager_setup_s,
        "bytes_sent": sent,
        "bytes_by_op": by_op,
        "calls_by_op": calls,
        "allreduce_numels": sorted({numel for op, numel, *_ in pg.log}),
        "allreduce_itemsizes": sorted({isz for _, _, isz, _, _ in pg.log}),
        "pg_configures": pg.configures,
        "commits": manager.current_step(),
        "batches_committed": manager.batches_committed(),
        "num_params": model.num_params(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out) / f".torchft_rank{i}.json"
    tmp.write_text(json.dumps(out))
    os.replace(tmp, Path(args.out) / f"torchft_rank{i}.json")
    # Leave only once every replica has written its results: a file barrier, so that no replica
    # tears down its Gloo connections while a peer may still be in the last all-reduce.
    deadline = time.time() + 300
    while time.time() < deadline and not all(
        (Path(args.out) / f"torchft_rank{r}.json").exists() for r in range(n)
    ):
        time.sleep(0.1)
    manager.shutdown(wait=False)
    sys.stdout.flush()
    os._exit(0)  # torchft's Rust threads can keep a normal interpreter exit waiting


if __name__ == "__main__":
    main()
