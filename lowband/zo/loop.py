"""The `lowband finetune` loop of one worker: ZO steps, eval, metrics, the log, checkpoints, resume.

No backward pass and no optimizer state: each step is `ZOTrainer.step` (two forwards per slot, or
one per rank of a perturbation pair) and the update every rank applies from the gathered scalars.

On disk (the run folder of lowband.train.rundir, so `lowband report` reads ZO runs as it reads
`lowband train` runs):
  zo_log.jsonl         one line per step, written by rank 0 after the step is applied:
                       {"step": s, "entries": [[slot, seed, code_hex], ...]}
  ckpt/step_N/rank0.pt the model weights at step N, the log lines since the previous checkpoint
                       and rank 0's byte counters. Written by rank 0 alone, marked world_size 1:
                       every rank holds the same weights, so any number of workers can resume.
Resume (and any newcomer): load the latest checkpoint, replay the log lines after it (no model
transfer; lowband.zo.distributed.replay) and continue after the last logged step. So a crash loses
at most the step in flight, however rarely the model is saved.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lowband.comm import Comm
from lowband.config import FinetuneConfig
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.train import checkpoint
from lowband.train.chaos import Chaos
from lowband.train.compute import wants_compile
from lowband.train.loop import (
    MetricsWriter,
    Timers,
    backend_name,
    evaluate,
    run_loop,
    summary_from_rows,
    summary_row,
)
from lowband.train.meta import run_meta
from lowband.train.rundir import RunDir, write_json_atomic
from lowband.train.session import LocalSession
from lowband.zo import rng
from lowband.zo.distributed import ZOEntry, ZOLog, ZOTrainer, replay
from lowband.zo.models import build_for_finetune

# Fields a resumed (or re-sized) run may change: how it is observed, and how many workers and
# which layout compute the next steps. The log replays the same whatever they were.
ELASTIC_FIELDS = {
    "eval_every",
    "eval_batches",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "threads",
    "compile",
    "workers",
    "device",
    "link",
    "perturb_parallel",
    "restore",
    "steps",
}


def fingerprint(cfg: FinetuneConfig, corpus_sha256: str) -> str:
    """What a checkpoint and log must agree with to be continued: the update rule and the data."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ELASTIC_FIELDS}
    d["corpus_sha256"] = corpus_sha256
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def log_path(run: RunDir) -> Path:
    return run.path / "zo_log.jsonl"


def read_log(run: RunDir, cfg: FinetuneConfig, after: int) -> ZOLog:
    """The log's steps after `after`, up to the first gap or cut-off line (a crash mid-write)."""
    log = ZOLog(lr=cfg.lr, wd=cfg.weight_decay, bits=cfg.bits, center=cfg.center)
    path = log_path(run)
    if not path.exists():
        return log
    expect = after + 1
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec["step"] < expect:
            continue
        if rec["step"] != expect:
            break
        for slot, seed, code in rec["entries"]:
            log.append(ZOEntry(rec["step"], slot, seed, bytes.fromhex(code)))
        expect += 1
    return log


def resume_point(run: RunDir, cfg: FinetuneConfig, fp: str) -> tuple[Any, int]:
    """(latest checkpoint or None, last step the log reaches after it)."""
    ckpts = run.checkpoints()
    ckpt = ckpts[-1] if ckpts else None
    if ckpt is not None:
        run.verify_checkpoint(ckpt, fp, 1)
    base = ckpt.step if ckpt else 0
    return ckpt, max([base, *read_log(run, cfg, base).steps()])


def param_digest(model: torch.nn.Module) -> bytes:
    """8 bytes that differ if any parameter bit differs (blake2b over the raw bytes)."""
    h = hashlib.blake2b(digest_size=8)
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class FinetuneJob:
    """`lowband finetune`'s job for the loop skeleton (lowband.train.loop.run_loop): one ZO step
    per call, whose (seed, scalar) entries rank 0 appends to the log; checkpoints by rank 0 only."""

    def __init__(
        self, cfg, zo, sampler, loss_fn, device, log_file, run, fp, timers, wall, start,
        *, label: str, tokens_per_step: int, evaluate,
    ) -> None:  # fmt: skip
        self.cfg, self.zo, self.sampler, self.loss_fn, self.device = (
            cfg,
            zo,
            sampler,
            loss_fn,
            device,
        )
        self.log_file, self.run, self.fp, self.timers, self.wall = log_file, run, fp, timers, wall
        self.steps, self.step, self.start_step = cfg.steps, start, start
        self.label, self.tokens_per_step, self._evaluate = label, tokens_per_step, evaluate
        self.abs_g = 0.0
        self._since_ckpt = 0

    def take_step(self) -> float:
        self.step += 1
        x, y = (t.to(self.device, non_blocking=True) for t in self.sampler.batch(self.step))
        result = self.zo.step(self.loss_fn, (x, y), self.step)
        self.abs_g = sum(abs(g) for g in result.grads) / len(result.grads)
        if self.log_file is not None:
            new = self.zo.log.entries[-len(result.grads) :]
            line = [[e.slot, e.seed, e.code.hex()] for e in new]
            self.log_file.write(json.dumps({"step": self.step, "entries": line}) + "\n")
        return result.loss

    def evaluate(self) -> float:
        loss = self._evaluate()
        self.zo.model.eval()  # evaluate() leaves the model in train mode
        return loss

    def metrics(self) -> dict[str, Any]:
        return {"lr": self.cfg.lr, "zo_abs_g": self.abs_g}

    def start_record(self, rank: int) -> dict[str, Any]:
        """The metrics line of step 0: the evaluation before the first step (no train loss)."""
        stats, eval_loss = self.zo.comm.stats, self.evaluate()
        return {
            "step": 0,
            "tokens": 0,
            "eval_loss": eval_loss,
            "bytes_sent": stats.bytes_sent,
            "bytes_recv": stats.bytes_recv,
            "compute_time": self.timers.compute,
            "comm_time": stats.seconds,
            "wall_time": self.wall(),
            "rank": rank,
            **self.metrics(),
        }

    def save(self, step: int) -> None:
        if self.zo.comm.rank != 0:
            return
        zo = self.zo
        since = ZOLog(**{**vars(zo.log), "entries": zo.log.entries[self._since_ckpt :]})
        state = {
            "model": zo.model.state_dict(),
            "zo_log": since.to_json(),
            "comm_stats": zo.comm.stats.state_dict(),
            "timers": {"compute": self.timers.compute, "wall_offset": self.wall()},
        }
        checkpoint.save(self.run, step, 0, 1, self.fp, state)
        self.run.prune_checkpoints(self.cfg.keep_checkpoints)
        self._since_ckpt = len(zo.log.entries)

    def close(self) -> None:
        pass


def _resume(run: RunDir, cfg: FinetuneConfig, fp: str, ckpt, zo: ZOTrainer) -> tuple[Timers, int]:
    """Load the latest checkpoint (if any) and replay the log after it: (timers, last step)."""
    timers, start = Timers(), 0
    if ckpt is not None:
        state = checkpoint.load(ckpt.path, 0, fp)
        zo.model.load_state_dict(state["model"])
        zo.comm.stats.load_state_dict(state["comm_stats"])
        timers = Timers(**state["timers"])
        start = state["step"]
    replayed = read_log(run, cfg, start)  # a restarted or new worker catches up from the log
    start = replay(zo.model, replayed, from_step=start + 1)
    zo.log.entries.extend(replayed.entries)  # part of the next checkpoint's "since" log
    return timers, start


def _mode(cfg: FinetuneConfig, groups: int) -> str:
    """zo (data parallel), zo-pp (one perturbation pair) or zo-2d (pairs x data parallel)."""
    if not cfg.perturb_parallel:
        return "zo"
    return "zo-2d" if groups > 1 else "zo-pp"


def _check_replicas(model: torch.nn.Module, comm: Comm) -> bytes:
    """All-gather an 8-byte parameter digest; RuntimeError unless every worker holds the same."""
    mine = param_digest(model)
    digest = torch.tensor(list(mine), dtype=torch.uint8, device=comm.device)
    digests = [torch.empty_like(digest) for _ in range(comm.size)]
    comm.all_gather(digests, digest)
    if any(not torch.equal(d.cpu(), digest.cpu()) for d in digests):
        raise RuntimeError("the workers' parameters differ at the end (replicas diverged)")
    return mine


def finetune_worker(
    cfg: FinetuneConfig, comm: Comm, run: RunDir, device: torch.device, resume: bool = False
) -> dict:
    """Fine-tune on this worker until cfg.steps; returns the run's summary (on every rank)."""
    rank, world = comm.rank, comm.size
    corpus = load_corpus(cfg.data)
    train_tokens, eval_tokens = split_eval(corpus)
    fp = fingerprint(cfg, corpus.sha256)
    ckpt = resume_point(run, cfg, fp)[0] if resume else None
    # A checkpoint holds the weights: --init is read only by a run that has none yet.
    init = cfg.init if ckpt is None else None
    model = build_for_finetune(cfg.model, corpus.vocab_size, cfg.seed, device, init)
    model.eval()  # no dropout in the forwards (our models have none; HF configs may)
    rng.configure(compile=wants_compile(cfg.compile, device))  # the same numbers either way
    t_start = time.perf_counter()
    zo = ZOTrainer(
        model,
        comm,
        lr=cfg.lr,
        eps=cfg.eps,
        wd=cfg.weight_decay,
        bits=cfg.bits,
        seed=cfg.seed,
        center=cfg.center,
        samples=cfg.samples,
        perturb_parallel=bool(cfg.perturb_parallel),
        restore=cfg.restore,  # type: ignore[arg-type]
    )
    sampler = ShardSampler(
        train_tokens,
        rank=zo.group,
        world_size=zo.groups,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    evals = eval_batches(
        eval_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_batches=cfg.eval_batches
    )
    use_bf16 = device.type == "cuda"
    # No weight-cast cache: it would keep a bf16 copy of every weight alive through each forward,
    # which only pays off when a backward reuses it, and ZO has none.
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
        if use_bf16
        else nullcontext
    )

    def loss_fn(m, batch):
        with autocast():
            return m.loss(*batch)

    timers, start = _resume(run, cfg, fp, ckpt, zo) if resume else (Timers(), 0)
    run.truncate_metrics(rank, start if start else -1)  # a fresh start writes its own step 0
    if rank == 0 and not resume:
        write_json_atomic(
            run.meta_path,
            run_meta(
                corpus=corpus,
                model_params=sum(p.numel() for p in model.parameters()),
                world_size=world,
                device=device,
                backend=backend_name(comm),
            ),
        )

    tokens_per_step = cfg.batch_size * cfg.seq_len * zo.groups
    metrics = MetricsWriter(run.metrics_path(rank))
    log_file = open(log_path(run), "a", buffering=1) if rank == 0 else None
    mode = _mode(cfg, zo.groups)
    wall = lambda: timers.wall_offset + time.perf_counter() - t_start  # noqa: E731
    job = FinetuneJob(
        cfg, zo, sampler, loss_fn, device, log_file, run, fp, timers, wall, start,
        label=f"{mode} x{world} {cfg.model}", tokens_per_step=tokens_per_step,
        evaluate=lambda: evaluate(model, evals, device, autocast),
    )  # fmt: skip
    session = LocalSession(cfg, comm, chaos=Chaos())
    try:
        if start == 0:  # where the curve starts: the model before any step
            metrics.write(job.start_record(rank))
        eval_loss, loss_value = run_loop(job, cfg, session, metrics, timers, wall)
    finally:
        metrics.close()
        if log_file is not None:
            log_file.close()

    by_op = comm.stats.by_op()
    summary = session.finish(
        summary_row(comm, timers, wall()),
        lambda table: summary_from_rows(
            table, by_op, cfg.steps, tokens_per_step, eval_loss, loss_value
        ),
        {},
    )
    summary.update(
        mode=mode, param_digest=_check_replicas(model, comm).hex(), replicas_identical=True
    )
    if rank == 0:
        write_json_atomic(run.summary_path, summary)
    return summary
