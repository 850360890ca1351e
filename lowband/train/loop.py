"""The training loop of one worker: inner steps, the algorithm's hooks, eval, metrics, checkpoints.

The loop knows nothing about any particular algorithm: it calls `algo.sync_gradients()` between
backward and the optimizer step and `algo.step()` after it (lowband.algorithms.base).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms import build_algorithm
from lowband.comm import Comm, LinkSpec
from lowband.config import TrainConfig
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.fault.elastic import JobFinished
from lowband.models import build_model
from lowband.seqpar.train import SeqParallel
from lowband.train import checkpoint
from lowband.train.chaos import Chaos, kill_self, parse_chaos, stall_self
from lowband.train.meta import run_meta
from lowband.train.progress import ProgressBar
from lowband.train.rundir import RunDir, fingerprint, write_json_atomic


def total_steps(cfg: TrainConfig, world_size: int) -> int:
    if cfg.tokens is not None:
        groups = world_size // cfg.cp  # the ranks of a cp group share their sequences (#6)
        return max(1, math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len * groups)))
    return cfg.steps


def lr_lambda(cfg: TrainConfig, steps: int):
    warmup = cfg.resolved_warmup(steps)

    def f(step: int) -> float:  # step counts completed optimizer steps
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    return f


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches, device: torch.device, autocast, loss_fn=None
) -> float:
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast():
            x, y = x.to(device), y.to(device)
            total += (model.loss(x, y) if loss_fn is None else loss_fn(model, x, y)).item()
    model.train()
    return total / len(batches)


@dataclass
class Timers:
    compute: float = 0.0
    wall_offset: float = 0.0  # wall time of earlier sessions of a resumed run


class MetricsWriter:
    def __init__(self, path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


@dataclass
class Seat:
    """An elastic worker's place in the job (lowband.fault.elastic): fixed for its lifetime."""

    index: int
    """The worker's number: its metrics file and data shard (index % --workers)."""
    lighthouse: str
    joining: bool = False
    """True for a newcomer or a restarted worker: it heals from a live peer before training."""
    store: str | None = None
    """HOST:PORT of the launcher's TCPStore: the first workers start together there, and the
    first worker to finish says so there (a worker still behind then leaves instead of going on
    alone)."""


def train_worker(
    cfg: TrainConfig,
    comm: Comm,
    run: RunDir,
    device: torch.device,
    resume: bool = False,
    seat: Seat | None = None,
) -> dict:
    """Train on this worker until cfg's last step; returns the run's summary (on every rank).

    With a `seat` (elastic training) `comm` is only a placeholder: every synchronisation gets the
    Comm of its quorum from the worker's Membership.
    """
    rank, world = (seat.index, cfg.workers) if seat else (comm.rank, comm.size)
    corpus = load_corpus(cfg.data)
    train_tokens, eval_tokens = split_eval(corpus)
    steps = total_steps(cfg, world)
    fp = fingerprint(cfg, corpus.sha256)

    sp = SeqParallel.from_config(cfg, comm, device)  # sequence parallelism (#6); off: a no-op
    model = build_model(
        cfg.model, vocab_size=corpus.vocab_size, seed=cfg.seed, device=device, attn_fn=sp.attn_fn
    )
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.resolved_lr(),
        betas=(0.9, 0.95),
        weight_decay=cfg.weight_decay,
        foreach=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    t_start = time.perf_counter()  # the algorithm's set-up traffic belongs to the run's wall-clock
    algo = build_algorithm(cfg, model, opt, comm)
    sampler = ShardSampler(
        train_tokens,
        rank=(rank % world) if seat else sp.dp_rank,
        world_size=world if seat else sp.dp_size,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed
        + 7919 * (rank // world),  # a worker beyond --workers shares a shard, not its batches
    )
    sampler = algo.wrap_sampler(sampler)  # label-flip attackers, gradient coding's parts (#7)
    evals = eval_batches(
        eval_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_batches=cfg.eval_batches
    )
    use_bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    timers = Timers()
    start = 0
    if resume and (ckpts := run.checkpoints()):
        state = checkpoint.load(ckpts[-1].path, rank, fp)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        algo.load_state_dict(state["algo"])
        comm.stats.load_state_dict(state["comm_stats"])
        timers = Timers(**state["timers"])
        start = state["step"]
    if seat is None:
        run.truncate_metrics(rank, start)
    if rank == 0 and not resume and not (seat and seat.joining):
        write_json_atomic(
            run.meta_path,
            run_meta(
                corpus=corpus,
                model_params=model.num_params(),
                world_size=world,
                device=device,
                backend=comm.group.name() if comm.group is not None else "none",
            ),
        )

    chaos = parse_chaos(cfg) if not (seat and seat.joining) else Chaos()
    tokens_per_step = cfg.batch_size * cfg.seq_len * (world if seat else sp.dp_size)
    metrics = MetricsWriter(run.metrics_path(rank))
    bar = ProgressBar(steps, start, f"{cfg.algo} x{world} {cfg.model}", enabled=rank == 0)
    wall = lambda: timers.wall_offset + time.perf_counter() - t_start
    eval_loss: float | None = None
    loss_value = float("nan")

    def checkpoint_state() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "algo": algo.state_dict(),
            "comm_stats": comm.stats.state_dict(),
            "timers": {"compute": timers.compute, "wall_offset": wall()},
        }

    membership = job_store = None
    healed_to: list[int] = []  # the step a heal jumped to, set by the membership's callback
    position = {"step": start}
    if seat is not None:
        from lowband.fault.elastic import Membership

        def live_state() -> dict[str, Any]:  # what a newcomer receives from this worker
            return {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "algo": algo.state_dict(),
                "step": position["step"],
            }

        def load_live_state(state: dict[str, Any]) -> None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            algo.load_state_dict(state["algo"])
            healed_to.append(int(state["step"]))
            position["step"] = int(state["step"])

        def write_event(event: dict[str, Any]) -> None:
            metrics.write({**event, "step": position["step"], "wall_time": wall(), "rank": rank})

        membership = Membership(
            replica_id=f"replica_{seat.index}",
            lighthouse=seat.lighthouse,
            min_workers=cfg.min_workers,
            state_dict=live_state,
            load_state_dict=load_live_state,
            link=LinkSpec.parse(cfg.link),
            stats=comm.stats,
            seed=cfg.seed,
            timeout_s=cfg.timeout,
            quorum_timeout_s=cfg.quorum_timeout,
            joining=seat.joining,
            on_event=write_event,
        )
        algo.attach(
            membership,
            join=seat.joining,
            on_event=write_event,
            parity_every=cfg.parity_every,
            detect_every=cfg.detect_every,
        )
        if seat.joining:
            write_event({"event": "joined", "replica": membership.replica_id})
        job_store = _job_store(seat.store, cfg.quorum_timeout) if seat.store else None
        if job_store is not None:
            membership.job_finished = lambda: job_store.check(["lowband/finished"])
            if not seat.joining:
                _start_together(job_store, cfg.workers, cfg.quorum_timeout)

    left = False
    try:
        step = start
        while step < steps:
            step += 1
            position["step"] = step
            t0, comm0 = time.perf_counter(), comm.stats.seconds
            if not getattr(algo, "joining", False):
                x, y = (t.to(device, non_blocking=True) for t in sampler.batch(step))
                with autocast():
                    loss = sp.loss(model, x, y)
                loss.backward()
            else:  # a newcomer heals inside the algorithm's hook before it trains
                loss = torch.tensor(float("nan"))
            algo.sync_gradients()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            algo.step()
            if healed_to:  # this worker now holds a live peer's state, at the peer's step
                step = position["step"] = healed_to.pop()
                start = step - 1  # tokens/s of this worker count from here
            loss_value = loss.item()  # also waits for the device
            timers.compute += (time.perf_counter() - t0) - (comm.stats.seconds - comm0)

            last = step == steps
            do_eval = last or step % cfg.eval_every == 0
            if do_eval:
                eval_loss = evaluate(model, evals, device, autocast, sp.loss)
            if do_eval or last or step % cfg.log_every == 0:
                record = {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "train_loss": loss_value,
                    "lr": sched.get_last_lr()[0],
                    "bytes_sent": comm.stats.bytes_sent,
                    "bytes_recv": comm.stats.bytes_recv,
                    "compute_time": timers.compute,
                    "comm_time": comm.stats.seconds,
                    "wall_time": wall(),
                    "rank": rank,
                    **algo.metrics(),
                }
                if do_eval:
                    record["eval_loss"] = eval_loss
                metrics.write(record)
            if (
                cfg.ckpt_every >= 0
                and seat is None
                and (last or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0))
            ):
                checkpoint.save(run, step, rank, world, fp, checkpoint_state())
                if rank == 0:
                    run.prune_checkpoints(cfg.keep_checkpoints)
            elapsed = wall() - timers.wall_offset
            bar.update(
                step,
                tokens_per_s=(step - start) * tokens_per_step / max(elapsed, 1e-9),
                loss=loss_value,
                mb_sent=comm.stats.bytes_sent / 1e6,
                eval_loss=eval_loss,
                exposed_comm_s=comm.stats.seconds,
                extra=algo.metrics(),
            )
            if chaos:
                _inject(chaos, rank, step, metrics, membership)
        algo.close()
    except JobFinished:
        left = True
        write_event({"event": "left", "reason": "the job finished while this worker was behind"})
    finally:
        bar.close()
        metrics.close()
        if membership is not None:
            membership.shutdown()

    if seat is not None and left:
        return {}
    if seat is not None:
        if job_store is not None:
            job_store.set(
                "lowband/finished", str(step)
            )  # no collective over a group that may have changed: the launcher merges
        row = _summary_row(comm, timers, wall())
        write_json_atomic(
            run.path / "summaries" / f"rank{rank}.json",
            {
                "row": row,
                "by_op": comm.stats.by_op(),
                "eval_loss": eval_loss,
                "train_loss": loss_value,
            },
        )
        return {}
    return _summarise(cfg, comm, run, steps, tokens_per_step, eval_loss, loss_value, timers, wall())


def _job_store(address: str, timeout_s: float):
    import datetime

    import torch.distributed as dist

    host, port = address.rsplit(":", 1)
    return dist.TCPStore(
        host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _start_together(store, workers: int, timeout_s: float) -> None:
    """Wait until every first worker heartbeats to the Lighthouse, so the first quorum has them
    all (otherwise the quickest would start alone and the others would heal from it)."""
    store.add("lowband/ready", 1)
    deadline = time.monotonic() + timeout_s
    while store.add("lowband/ready", 0) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the first {workers} workers did not all start in {timeout_s:g}s")
        time.sleep(0.05)


def _inject(chaos: Chaos, rank: int, step: int, metrics: MetricsWriter, membership) -> None:
    if (rank, step) in chaos.kills:
        metrics.close()
        kill_self()  # injected fault: SIGKILL, no cleanup, as `kill -9` would
    if (rank, step) in chaos.stalls:
        stall_self(chaos.stalls[(rank, step)])
    if (rank, step) in chaos.throttles and membership is not None:
        membership.throttle(chaos.throttles[(rank, step)])


def _summary_row(comm: Comm, timers: Timers, wall_time: float) -> list[float]:
    return [
        float(comm.stats.bytes_sent),
        float(comm.stats.bytes_recv),
        timers.compute,
        comm.stats.seconds,
        wall_time,
    ]


def _summarise(
    cfg, comm: Comm, run: RunDir, steps, tokens_per_step, eval_loss, loss_value, timers, wall_time
) -> dict:
    """Gather every worker's totals (a few numbers, counted as 'summary' traffic) and write summary.json."""
    mine = torch.tensor(
        _summary_row(comm, timers, wall_time), dtype=torch.float64, device=comm.device
    )
    rows = [torch.empty_like(mine) for _ in range(comm.size)]
    by_op = comm.stats.by_op()
    comm.all_gather(rows, mine)
    summary = summary_from_rows(
        torch.stack(rows).cpu(), by_op, steps, tokens_per_step, eval_loss, loss_value
    )
    if comm.rank == 0:
        write_json_atomic(run.summary_path, summary)
    return summary


def summary_from_rows(table, by_op, steps, tokens_per_step, eval_loss, loss_value) -> dict:
    """summary.json from one row per worker (bytes sent, bytes received, compute, comm, wall)."""
    table = torch.as_tensor(table, dtype=torch.float64)
    summary = {
        "final_eval_loss": eval_loss,
        "final_train_loss": loss_value,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "wall_time": float(table[:, 4].max()),
        "tokens_per_s": steps * tokens_per_step / float(table[:, 4].max()),
        "bytes_sent_per_worker": float(table[:, 0].mean()),
        "bytes_sent_total": float(table[:, 0].sum()),
        "bytes_recv_total": float(table[:, 1].sum()),
        "compute_time_per_worker": float(table[:, 2].mean()),
        "comm_time_per_worker": float(table[:, 3].mean()),
        "compute_utilisation": float(table[:, 2].sum() / table[:, 4].sum()),
        "bytes_by_op": {k: v["bytes_sent"] for k, v in by_op.items()},
        "world_size": int(table.shape[0]),
    }
    return summary
