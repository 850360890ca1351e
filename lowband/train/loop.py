"""The training loop of one worker: inner steps, the algorithm's hooks, eval, metrics, checkpoints.

The loop knows nothing about any particular algorithm: it calls `algo.sync_gradients()` between
backward and the optimizer step and `algo.step()` after it (lowband.algorithms.base).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lowband.algorithms import build_algorithm
from lowband.comm import Comm
from lowband.config import TrainConfig
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.models import build_model
from lowband.seqpar.train import SeqParallel
from lowband.train import checkpoint
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


def train_worker(
    cfg: TrainConfig, comm: Comm, run: RunDir, device: torch.device, resume: bool = False
) -> dict:
    """Train on this worker until cfg's last step; returns the run's summary (on every rank)."""
    rank, world = comm.rank, comm.size
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
        rank=sp.dp_rank,
        world_size=sp.dp_size,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
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
    run.truncate_metrics(rank, start)
    if rank == 0 and not resume:
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

    fail_rank, fail_step = (int(v) for v in cfg.fail_at.split(":")) if cfg.fail_at else (-1, -1)
    tokens_per_step = cfg.batch_size * cfg.seq_len * sp.dp_size
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

    try:
        for step in range(start + 1, steps + 1):
            t0, comm0 = time.perf_counter(), comm.stats.seconds
            x, y = (t.to(device, non_blocking=True) for t in sampler.batch(step))
            with autocast():
                loss = sp.loss(model, x, y)
            loss.backward()
            algo.sync_gradients()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            algo.step()
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
            if cfg.ckpt_every >= 0 and (
                last or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
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
            if rank == fail_rank and step == fail_step:
                metrics.close()
                os._exit(1)  # injected fault: die without cleanup, as a killed process would
        algo.close()
    finally:
        bar.close()
        metrics.close()

    return _summarise(cfg, comm, run, steps, tokens_per_step, eval_loss, loss_value, timers, wall())


def _summarise(
    cfg, comm: Comm, run: RunDir, steps, tokens_per_step, eval_loss, loss_value, timers, wall_time
) -> dict:
    """Gather every worker's totals (a few numbers, counted as 'summary' traffic) and write summary.json."""
    mine = torch.tensor(
        [
            comm.stats.bytes_sent,
            comm.stats.bytes_recv,
            timers.compute,
            comm.stats.seconds,
            wall_time,
        ],
        dtype=torch.float64,
        device=comm.device,
    )
    rows = [torch.empty_like(mine) for _ in range(comm.size)]
    by_op = comm.stats.by_op()
    comm.all_gather(rows, mine)
    table = torch.stack(rows).cpu()
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
        "world_size": comm.size,
    }
    if comm.rank == 0:
        write_json_atomic(run.summary_path, summary)
    return summary
