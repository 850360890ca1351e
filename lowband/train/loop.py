"""The loop of one worker: steps, evaluation, metrics, checkpoints, progress; and `train_worker`.

`run_loop` is the one loop skeleton. It runs a `Job` (a step function and the hooks around it):
`lowband train` plugs in `TrainJob` (forward, backward, the algorithm's hooks around the
optimizer step; lowband.train.state), `lowband finetune` its zeroth-order job (lowband.zo.loop).
The loop knows nothing of any algorithm, nor of membership: a `Session` (lowband.train.session)
says how this worker takes part in the job (static or elastic), and a heal inside a step moves
the job's step, which the loop simply reads.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lowband.algorithms import build_algorithm
from lowband.algorithms.robust import robust_label
from lowband.comm import Comm
from lowband.config import TrainConfig
from lowband.data import eval_batches, load_corpus
from lowband.data.partition import make_sampler, split_heldout
from lowband.errors import CheckpointError
from lowband.models import build_model
from lowband.seqpar.train import SeqParallel
from lowband.train import checkpoint
from lowband.train.compute import inner_optimizer, prepare_model, wants_compile
from lowband.train.meta import run_meta
from lowband.train.progress import ProgressBar
from lowband.train.rundir import RunDir, fingerprint, write_json_atomic
from lowband.train.session import LocalSession
from lowband.train.state import TrainState, TrainStep


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
    losses = []
    for x, y in batches:
        with autocast():
            x, y = x.to(device), y.to(device)
            losses.append((model.loss(x, y) if loss_fn is None else loss_fn(model, x, y)).float())
    model.train()
    return sum(torch.stack(losses).tolist()) / len(batches)  # one wait for the device


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


class Job(Protocol):
    """What `run_loop` runs. `step` is the last step taken (a heal may move it)."""

    steps: int
    tokens_per_step: int
    label: str
    step: int
    start_step: int

    def take_step(self) -> float | torch.Tensor: ...  # one step; its loss (read when written)
    def evaluate(self) -> float: ...
    def metrics(self) -> dict[str, Any]: ...  # fields of the metrics line (lr, ...)
    def save(self, step: int) -> None: ...  # a checkpoint at `step`
    def close(self) -> None: ...  # finish communication still in flight


def run_loop(
    job: Job, cfg: Any, session: LocalSession, metrics: MetricsWriter, timers: Timers, wall
) -> tuple[float | None, float]:
    """Take the job's steps to its last; returns (last eval loss, last training loss)."""
    stats = session.stats
    bar = ProgressBar(job.steps, job.step, job.label, enabled=session.index == 0)
    eval_loss: float | None = None
    loss = float("nan")  # the last loss read: a step's loss stays on the device until written
    try:
        with session.running():
            while job.step < job.steps:
                t0, comm0 = time.perf_counter(), stats.seconds
                step_loss = job.take_step()
                step = job.step
                last = step == job.steps
                do_eval = last or step % cfg.eval_every == 0
                write = do_eval or step % cfg.log_every == 0
                if write:
                    loss = float(step_loss)  # waits for the device: part of the step's compute
                timers.compute += (time.perf_counter() - t0) - (stats.seconds - comm0)
                if do_eval:
                    eval_loss = job.evaluate()
                if write:
                    record = {
                        "step": step,
                        "tokens": step * job.tokens_per_step,
                        "train_loss": loss,
                        "bytes_sent": stats.bytes_sent,
                        "bytes_recv": stats.bytes_recv,
                        "compute_time": timers.compute,
                        "comm_time": stats.seconds,
                        "wall_time": wall(),
                        "rank": session.index,
                        **job.metrics(),
                    }
                    if do_eval:
                        record["eval_loss"] = eval_loss
                    metrics.write(record)
                if cfg.ckpt_every >= 0 and (
                    last or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
                ):
                    job.save(step)
                elapsed = wall() - timers.wall_offset
                bar.update(
                    step,
                    tokens_per_s=(step - job.start_step) * job.tokens_per_step / max(elapsed, 1e-9),
                    loss=loss,
                    bytes_sent=stats.bytes_sent,
                    eval_loss=eval_loss,
                    exposed_comm_s=stats.seconds,
                    extra=job.metrics(),
                )
                session.after_step(step, before_kill=metrics.close)
            job.close()
    finally:
        bar.close()
    return eval_loss, loss


class TrainJob:
    """`lowband train`'s job: TrainState + TrainStep, evaluation and checkpoints."""

    def __init__(self, cfg, state, step_fn, evaluate, session, run, fp, timers, wall, steps, tpt):
        self.cfg, self.state, self.take_step, self.evaluate = cfg, state, step_fn, evaluate
        self.session, self.run, self.fp, self.timers, self.wall = session, run, fp, timers, wall
        self.steps, self.tokens_per_step = steps, tpt
        robust = robust_label(cfg.to_dict())
        self.label = f"{cfg.algo} x{session.world} {cfg.model}" + (f" · {robust}" if robust else "")

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def start_step(self) -> int:
        return self.state.start_step

    def metrics(self) -> dict[str, Any]:
        return {"lr": self.state.scheduler.get_last_lr()[0], **self.state.algo.metrics()}

    def save(self, step: int) -> None:
        slot = self.session.checkpoint_slot()
        if slot is None:
            return
        rank, world = slot
        state = self.state.state_dict()  # first: it lets a reduction in flight land (and count)
        state.update(
            comm_stats=self.session.stats.state_dict(),
            timers={"compute": self.timers.compute, "wall_offset": self.wall()},
            digest=self.state.digest(),
            **self.session.checkpoint_extra(),
        )
        checkpoint.save(self.run, step, rank, world, self.fp, state)
        if rank == 0:
            self.run.prune_checkpoints(self.cfg.keep_checkpoints)

    def close(self) -> None:
        self.state.algo.close()


def train_worker(
    cfg: TrainConfig,
    comm: Comm,
    run: RunDir,
    device: torch.device,
    resume: bool = False,
    session: LocalSession | None = None,
) -> dict:
    """Train on this worker until cfg's last step; returns the run's summary (on every rank of a
    static job). `session`: how this worker takes part (default: a static job on `comm`; the
    elastic launcher passes an ElasticSession, whose rounds get their quorum's Comm)."""
    session = session if session is not None else LocalSession(cfg, comm)
    try:
        return _train(cfg, session, run, device, resume)
    finally:
        session.close()


def _train(cfg: TrainConfig, session: LocalSession, run: RunDir, device, resume: bool) -> dict:
    corpus = load_corpus(cfg.data)
    train_tokens, eval_tokens = split_heldout(corpus, cfg.partition)  # iid: the tail, as before
    steps = total_steps(cfg, session.world)
    fp = fingerprint(cfg, corpus.sha256)
    sp = SeqParallel.from_config(cfg, session.comm, device)  # sequence parallelism; off: a no-op
    model = build_model(
        cfg.model, vocab_size=corpus.vocab_size, seed=cfg.seed, device=device, attn_fn=sp.attn_fn
    )
    prepare_model(
        model,
        compile=wants_compile(cfg.compile, device, seq_parallel=cfg.seq_parallel is not None),
        activation_checkpointing=cfg.activation_checkpointing,
    )
    opt = inner_optimizer(
        model,
        cfg.inner_optimizer,
        lr=cfg.resolved_lr(),
        weight_decay=cfg.weight_decay,
        device=device,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    t_start = time.perf_counter()  # the algorithm's set-up traffic belongs to the run's wall-clock
    algo = build_algorithm(cfg, model, opt, session.group, index=session.index)
    state = TrainState(model, opt, sched, algo)
    shard, shards, seed_offset = session.shard(sp)
    sampler = make_sampler(  # --partition: iid is ShardSampler as before (lowband.data.partition)
        cfg,
        corpus,
        train_tokens,
        shard=shard,
        shards=shards,
        seed=cfg.seed + seed_offset,
        write=(lambda d: write_json_atomic(run.path / "partition.json", d))
        if session.index == 0 and not resume
        else None,
    )
    sampler = algo.wrap_sampler(sampler)  # label-flip attackers, gradient coding's parts
    evals = eval_batches(
        eval_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_batches=cfg.eval_batches
    )
    use_bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    timers, resumed = Timers(), None
    if resume:
        resumed, saved_timers = _load_checkpoint(run, session, state, fp)
        timers = saved_timers or timers
    wall = lambda: timers.wall_offset + time.perf_counter() - t_start  # noqa: E731
    if session.index == 0 and session.fresh and not resume:
        write_json_atomic(
            run.meta_path,
            run_meta(
                corpus=corpus,
                model_params=model.num_params(),
                world_size=session.world,
                device=device,
                backend=backend_name(session.comm),
            ),
        )

    tokens_per_step = cfg.batch_size * cfg.seq_len * shards
    metrics = MetricsWriter(run.metrics_path(session.index))
    events = lambda e: metrics.write(  # noqa: E731
        {**e, "step": state.step, "wall_time": wall(), "rank": session.index}
    )
    session.attach(state, events)
    if resumed is not None:
        events(resumed)
    step_fn = TrainStep(state, sampler, sp.loss, device, autocast, cfg.grad_clip)
    job = TrainJob(
        cfg,
        state,
        step_fn,
        lambda: evaluate(model, evals, device, autocast, sp.loss),
        session,
        run,
        fp,
        timers,
        wall,
        steps,
        tokens_per_step,
    )
    try:
        eval_loss, loss = run_loop(job, cfg, session, metrics, timers, wall)
    finally:
        metrics.close()
    by_op = session.stats.by_op()
    return session.finish(
        summary_row(session.comm, timers, wall()),
        lambda table: _write_summary(
            run,
            session,
            summary_from_rows(table, by_op, steps, tokens_per_step, eval_loss, loss),
            cfg,
        ),
        {"by_op": by_op, "eval_loss": eval_loss, "train_loss": loss},
    )


def _load_checkpoint(
    run: RunDir, session: LocalSession, state: TrainState, fp: str
) -> tuple[dict | None, Timers | None]:
    """Load the newest checkpoint into `state`, proved by its digest: the `resumed` event and, for
    this worker's own file, its timers. None, None when there is none: a run stopped before its
    first checkpoint starts again from step 0."""
    ckpts = run.checkpoints()
    if not ckpts:
        run.truncate_metrics(session.index, 0)
        return None, None
    ckpt = ckpts[-1]
    rank = (session.checkpoint_slot() or (0, 1))[0] if ckpt.world_size > 1 else 0
    saved = checkpoint.load(ckpt.path, rank, fp)
    state.load_state_dict(saved)
    digest = state.digest()
    if "digest" in saved and digest != saved["digest"]:
        raise CheckpointError(f"{ckpt.path}: the loaded state differs from the saved one")
    timers = None
    if ckpt.world_size == session.world:  # this worker's own counters
        session.stats.load_state_dict(saved["comm_stats"])
        timers = Timers(**saved["timers"])
    session.resumed(saved)
    run.truncate_metrics(session.index, state.step)
    return {"event": "resumed", "from_step": state.step, "digest": digest}, timers


def backend_name(comm: Comm) -> str:
    return comm.group.name() if comm.group is not None else "none"


def _write_summary(run: RunDir, session: LocalSession, summary: dict, cfg) -> dict:
    if (robust := robust_label(cfg.to_dict())) is not None:
        summary["robust"] = robust  # the rule, f and attack: what the loss was measured under
    if session.index == 0:
        write_json_atomic(run.summary_path, summary)
    return summary


def summary_row(comm: Comm, timers: Timers, wall_time: float) -> list[float]:
    """This worker's row of summary_from_rows: bytes sent, bytes received, compute, comm, wall."""
    return [
        float(comm.stats.bytes_sent),
        float(comm.stats.bytes_recv),
        timers.compute,
        comm.stats.seconds,
        wall_time,
    ]


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
