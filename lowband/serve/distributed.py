"""`lowband serve --parallel tp|pp|lamina|splitwise --workers N`: the HTTP server on worker 0,
the model split over N local processes (lowband.launch.local, as for `lowband generate`).
docs/inference.md, section 7.

1. The launcher binds the listening socket (a port in use fails in one line, exit 2, before any
   worker starts) and hands it to worker 0; every worker loads the model and keeps its part
   (a TPShard, a pipeline Stage, or the whole model for lamina and splitwise).
2. Worker 0 runs the HTTP server and the batching engine exactly as one process does
   (lowband.serve.http.Engine); each batch goes to `Runner`, which broadcasts the batch's
   description (every request's prompt, max_tokens, temperature, top_p and seed, pickled into a
   byte tensor) over the workers' Comm, then decodes it with them.
3. Workers 1..N-1 wait for the next message (`follow`): a batch, which they decode in lockstep
   with worker 0 (tp: generate_batch on their shard, every worker sampling the same tokens from
   the same all-reduced logits; pp: pp_pipeline, one micro-batch per request, sampling on the
   last stage; lamina: worker 0 computes and workers 1..N-1 are the memory workers, the batch's
   requests one after another, each as `lowband generate --parallel lamina` runs one, batch 1;
   splitwise: worker 0 is the decode pool and workers 1..N-1 the prefill pool, the batch's
   requests given to splitwise_requests as one stream arriving at once, one call per distinct
   temperature and top_p, decoded to that group's longest max_tokens), a keepalive (an idle server pings every KEEPALIVE_S, below the process group's
   10-minute timeout), or stop.
4. Stopping: Ctrl-C or SIGTERM reaches worker 0 (the launcher forwards it); its server stops, the
   engine sends stop, every worker leaves its loop and the process group closes normally.
   Workers 1..N-1 ignore SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C, or a service manager,
   signals the whole group): they cannot be stopped mid-batch, and still end with their
   launcher (lowband.launch.signals.exit_with_parent) or with a lost worker 0 (a failed recv).
5. A worker that dies: worker 0's next collective fails at once (the peer's socket closes), the
   engine answers that batch and every later request 503 with the reason, the server stops and
   the worker exits 1; the launcher, which sees the dead worker within 50 ms anyway, stops the
   rest and `lowband serve` exits 1 naming it. No wait is unbounded.
No deadlock: only worker 0's engine thread sends messages, and every worker handles them in the
order sent; within a batch every worker runs the same steps as `lowband generate` does for that
mode (a client that leaves mid-stream has its row finished, not stopped, so all stay in step).
"""

from __future__ import annotations

import functools
import pickle
import signal
import sys
import time
from typing import Any

import torch
from torch import nn

from lowband.comm import Comm
from lowband.serve.allreduce import ALL_REDUCES
from lowband.serve.config import GenerateConfig, ServeConfig
from lowband.serve.engine import encode, generate_batch, load_model, timings
from lowband.serve.lamina import lamina_generate
from lowband.serve.pp import Stage, pp_pipeline
from lowband.serve.requests import Request
from lowband.serve.sampling import Sampler
from lowband.serve.splitwise import splitwise_requests
from lowband.serve.tp import TPShard
from lowband.train.rundir import RunDir


def broadcast_message(comm: Comm, message: Any = None) -> Any:
    """Worker 0's `message` on every worker: its pickled size, then its bytes (two broadcasts)."""
    device = comm.device
    if comm.rank == 0:
        blob = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8).to(device)
        size = torch.tensor([blob.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    comm.broadcast(size, 0)
    if comm.rank != 0:
        blob = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    comm.broadcast(blob, 0)
    return message if comm.rank == 0 else pickle.loads(blob.cpu().numpy().tobytes())


def model_part(cfg: ServeConfig, comm: Comm, model: nn.Module) -> nn.Module:
    """This worker's part of `model`: its TP shard, its pipeline stage, or all of it (lamina's
    compute worker holds the weights, its memory workers read only the model's shape; splitwise's
    workers each hold a copy)."""
    if cfg.parallel in ("lamina", "splitwise"):
        return model
    if cfg.parallel == "tp":
        reduce = functools.partial(ALL_REDUCES[cfg.allreduce], comm)
        return TPShard(model, comm.rank, comm.size, reduce)
    return Stage(model, comm.rank, comm.size)


def run_batch(
    cfg: ServeConfig, comm: Comm, part: nn.Module, cfgs: list[GenerateConfig], calls
) -> list[dict[str, Any] | Exception] | None:
    """One batch on this worker, in lockstep with the others; per request its tokens and timings
    on worker 0 (the tokens go to `calls[i]` as they come), None elsewhere."""
    if cfg.parallel == "tp":
        outs = generate_batch(part, cfgs, calls)
        return outs if comm.rank == 0 else None
    if cfg.parallel == "lamina":
        return lamina_batch(comm, part, cfgs, calls)
    if cfg.parallel == "splitwise":
        return splitwise_batch(comm, part, cfgs, calls)
    # pp: one micro-batch per request (each stage then runs one process's operations on it, as
    # `lowband generate --parallel pp` does), decoded to the longest max_tokens; each request
    # keeps its first max_tokens (its sampler's later draws do not change them)
    reqs = [Request(i, encode(c.prompt), 0.0, c.seed) for i, c in enumerate(cfgs)]
    samplers = {i: Sampler(c.temperature, c.top_p, c.seed) for i, c in enumerate(cfgs)}
    counts = [0] * len(cfgs)

    def on_token(i: int, t: int) -> None:
        if counts[i] < cfgs[i].max_new_tokens:
            counts[i] += 1
            calls[i](t)

    n = max(c.max_new_tokens for c in cfgs)
    done = pp_pipeline(part, comm, [[r] for r in reqs], n, samplers, on_token)
    if done is None:
        return None
    t0, out = done
    return [
        {"tokens": [out[i][0][: c.max_new_tokens]], **timings(t0, out[i][1][: c.max_new_tokens])}
        for i, c in enumerate(cfgs)
    ]


def lamina_batch(
    comm: Comm, model: nn.Module, cfgs: list[GenerateConfig], calls
) -> list[dict[str, Any]] | None:
    """Lamina serves one prompt at a time (its memory workers' cache is batch 1): the batch's
    requests one after another, each exactly `lowband generate --parallel lamina`'s run."""
    device = next(model.parameters()).device
    outs = []
    for c, call in zip(cfgs, calls, strict=True):
        prompt_BL = torch.tensor([encode(c.prompt)], device=device)
        sampler = Sampler(c.temperature, c.top_p, c.seed)
        outs.append(lamina_generate(model, comm, prompt_BL, c.max_new_tokens, sampler, call))
    return outs if comm.rank == 0 else None


def splitwise_batch(
    comm: Comm, model: nn.Module, cfgs: list[GenerateConfig], calls
) -> list[dict[str, Any]] | None:
    """Worker 0 decodes, workers 1..N-1 prefill (splitwise_requests with N - 1 prefill workers,
    so every request's decode worker is the one that answers it). splitwise_requests takes one
    temperature, top_p and max_new_tokens: one call per (temperature, top_p), decoded to that
    group's longest max_tokens, each request keeping its first max_tokens (its sampler's later
    draws do not change them, as for pp)."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault((c.temperature, c.top_p), []).append(i)
    outs: list[dict[str, Any]] = [{} for _ in cfgs]
    stamps: list[list[float]] = [[] for _ in cfgs]
    tokens: list[list[int]] = [[] for _ in cfgs]

    def on_token(i: int, t: int) -> None:
        if len(tokens[i]) < cfgs[i].max_new_tokens:
            stamps[i].append(time.perf_counter())
            tokens[i].append(t)
            calls[i](t)

    t0 = time.perf_counter()  # a later group's requests wait for the earlier groups
    for (temperature, top_p), ids in groups.items():
        reqs = [Request(i, encode(cfgs[i].prompt), 0.0, cfgs[i].seed) for i in ids]
        n = max(cfgs[i].max_new_tokens for i in ids)
        splitwise_requests(model, comm, reqs, comm.size - 1, n, temperature, top_p, on_token)
        for i in ids:  # the tokens reach worker 0 alone: a prefill worker's lists stay empty
            if comm.rank == 0:
                outs[i] = {"tokens": [tokens[i]], **timings(t0, stamps[i])}
    return outs if comm.rank == 0 else None


class Runner:
    """Worker 0's side (step 2): the Engine calls it with each batch."""

    def __init__(self, cfg: ServeConfig, comm: Comm, part: nn.Module) -> None:
        self.cfg, self.comm, self.part = cfg, comm, part

    def __call__(self, cfgs: list[GenerateConfig], calls) -> list[dict[str, Any] | Exception]:
        broadcast_message(self.comm, ("batch", [c.to_dict() for c in cfgs]))
        return run_batch(self.cfg, self.comm, self.part, cfgs, calls)

    def keepalive(self) -> None:
        broadcast_message(self.comm, ("keepalive", None))

    def close(self) -> None:
        broadcast_message(self.comm, ("stop", None))


def follow(cfg: ServeConfig, comm: Comm, part: nn.Module) -> None:
    """Workers 1..N-1 (step 3): decode each batch worker 0 sends until it says stop."""
    while True:
        kind, payload = broadcast_message(comm)
        if kind == "stop":
            return
        if kind == "batch":
            cfgs = [GenerateConfig.from_dict(d) for d in payload]
            run_batch(cfg, comm, part, cfgs, [lambda t: None] * len(cfgs))


class WorkerLost(RuntimeError):
    pass


def serve_worker(
    cfg: ServeConfig,
    comm: Comm,
    run: RunDir,
    device: torch.device,
    resume: bool = False,
    sock=None,
    max_seq_len: int = 4096,
) -> None:
    """launch_local's worker: worker 0 serves on `sock` (steps 2, 4, 5), the others follow."""
    del run, resume
    gen = GenerateConfig(model=cfg.model, init=cfg.init, seed=cfg.seed, dtype=cfg.dtype)
    part = model_part(cfg, comm, load_model(gen, device))
    if comm.rank != 0:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # worker 0 says when (step 4)
            signal.signal(s, signal.SIG_IGN)
        follow(cfg, comm, part)
        return
    from lowband.launch.signals import stop_on_signals
    from lowband.serve.http import make_server

    server, sock, engine = make_server(cfg, None, max_seq_len, Runner(cfg, comm, part), sock)
    try:
        with stop_on_signals():  # SIGTERM as Ctrl-C: uvicorn stops, then the engine's stop
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    if engine.broken is not None:
        print(f"lowband serve: {engine.broken}", file=sys.stderr, flush=True)
        raise WorkerLost(engine.broken)


def serve_parallel(cfg: ServeConfig, sock, max_seq_len: int) -> None:
    """Start cfg.workers local processes (lowband.launch.local) serving on `sock` (step 1).
    SIGINT, SIGTERM and SIGHUP to this launcher go to worker 0, which stops the others."""
    import multiprocessing as mp
    import os
    import tempfile

    from lowband.launch import launch_local

    def forward(_signum, _frame) -> None:
        for p in mp.active_children():
            if p.name == "lowband-worker-0" and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        with tempfile.TemporaryDirectory(prefix="lowband-serve-") as tmp:
            worker = functools.partial(serve_worker, sock=sock, max_seq_len=max_seq_len)
            launch_local(cfg, RunDir(tmp), False, worker=worker)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
