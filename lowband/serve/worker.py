"""What one `lowband generate` worker runs, and `generate(cfg)`, which starts them.

Workers are started by lowband.launch.local.launch_local (one process when --workers 1). Every
worker builds the model from --seed / --init and keeps its part (TP shard or PP stage). Worker 0
streams the text and writes RUN/result.json: the new tokens, the timings and every worker's bytes.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowband.comm import Comm
from lowband.serve.allreduce import ALL_REDUCES
from lowband.serve.config import GenerateConfig, validate_generate
from lowband.serve.engine import (
    CachedModel,
    TextSink,
    decode_loop,
    encode,
    generate_local,
    load_model,
)
from lowband.serve.lamina import lamina_generate
from lowband.serve.pp import Stage, pp_decode_loop, pp_requests
from lowband.serve.requests import gather_records, make_requests, start_together, summarize
from lowband.serve.sampling import Sampler
from lowband.serve.splitwise import colocated_requests, splitwise_requests
from lowband.serve.tp import TPShard
from lowband.serve.window import stream_layers, tensor_bytes
from lowband.train.rundir import RunDir


def run_one(
    cfg: GenerateConfig, comm: Comm, model, on_token=None, weights_dir: Path | None = None
) -> dict[str, Any] | None:
    """cfg's request (or --requests N of them) in cfg's mode on this worker; the result on
    worker 0, None elsewhere (several requests: lowband.serve.requests.summarize's figures).
    With cfg.memory_budget the layers are written under `weights_dir` and streamed back
    (lowband.serve.window); `model` then loses its layers."""
    device = next(model.parameters()).device
    if cfg.parallel == "none" and not hasattr(model, "forward_cached"):  # hf: its own cache
        return generate_local(model, cfg, on_token)
    stream = None if on_token is None else (lambda rid, t: on_token(t) if rid == 0 else None)
    if cfg.parallel in ("splitwise", "colocated"):
        # a stream of requests over pools of workers; the figures are collected on worker 0
        reqs = make_requests(cfg)
        start_together(comm, model)
        sample = (cfg.max_new_tokens, cfg.temperature, cfg.top_p, stream)
        if cfg.parallel == "splitwise":
            records = splitwise_requests(model, comm, reqs, cfg.prefill_workers, *sample)
        else:
            records = colocated_requests(model, comm, reqs, *sample)
        every = gather_records(comm, records)
        return None if every is None else summarize(every)
    if cfg.parallel == "pp" and cfg.requests > 1:
        stage = Stage(model, comm.rank, comm.size)
        return pp_requests(
            stage, comm, make_requests(cfg), cfg.micro_batches, cfg.max_new_tokens,
            cfg.temperature, cfg.top_p, stream,
        )  # fmt: skip
    prompt_BL = torch.tensor([encode(cfg.prompt)], device=device)
    sampler = Sampler(cfg.temperature, cfg.top_p, cfg.seed)
    if cfg.parallel == "lamina":
        return lamina_generate(model, comm, prompt_BL, cfg.max_new_tokens, sampler, on_token)
    if cfg.parallel == "pp":
        stage = Stage(model, comm.rank, comm.size)
        return pp_decode_loop(stage, comm, prompt_BL, cfg.max_new_tokens, sampler, on_token)
    target = model
    if cfg.parallel == "tp":
        target = TPShard(
            model, comm.rank, comm.size, functools.partial(ALL_REDUCES[cfg.allreduce], comm)
        )
    decoder = CachedModel(target, 1, prompt_BL.shape[1] + cfg.max_new_tokens)
    streamed = None
    if cfg.memory_budget is not None:
        resident = decoder.cache.nbytes() + sum(
            tensor_bytes(m) for m in (target.tok_embeddings, target.norm, target.output)
        )
        folder = (weights_dir or Path(tempfile.mkdtemp())) / f"weights-rank{comm.rank}"
        streamed = stream_layers(target, folder, int(cfg.memory_budget * 2**20), resident)
        if target is not model:  # tp: drop the full model's blocks too
            model.layers = nn.ModuleList()
    out = decode_loop(decoder, prompt_BL, cfg.max_new_tokens, sampler, on_token)
    if streamed is not None:
        out["memory"] = {
            "budget_bytes": int(cfg.memory_budget * 2**20), "resident_bytes": resident,
            "layer_bytes": max(streamed.layer_bytes), "window": streamed.window,
            "peak_layer_bytes": streamed.peak_bytes, "peak_bytes": resident + streamed.peak_bytes,
            "layer_loads": streamed.loads,
        }  # fmt: skip
    return out if comm.rank == 0 else None


def generate_worker(
    cfg: GenerateConfig,
    comm: Comm,
    run: RunDir,
    device: torch.device,
    resume: bool = False,
    modes: list[dict] | None = None,
) -> None:
    """launch_local's worker: run cfg (or each of `modes`, cfg fields to override, one after the
    other on the same workers) and write RUN/result.json on worker 0."""
    del resume
    model = load_model(cfg, device)
    results = []
    for override in modes or [{}]:
        c = GenerateConfig.from_dict({**cfg.to_dict(), **override})
        if isinstance(getattr(model, "layers", None), nn.ModuleList) and not len(model.layers):
            # the previous mode streamed them away
            model = load_model(cfg, device)
        sink = TextSink() if comm.rank == 0 and not c.quiet else None
        comm.start_together()  # every worker's clock starts here: TTFT is measured from it
        before = comm.stats.bytes_sent
        out = run_one(c, comm, model, sink, run.path)
        sent = torch.tensor([float(comm.stats.bytes_sent - before)])
        if comm.size > 1:  # after the request, so it is not in the figures
            every = [torch.zeros(1) for _ in range(comm.size)]
            comm.all_gather(every, sent)
            sent_by_worker = [int(t.item()) for t in every]
        else:
            sent_by_worker = [int(sent.item())]
        if comm.rank == 0:
            if sink is not None:
                sink.close()
            out["text"] = bytes(t for t in out["tokens"][0] if t < 256).decode("utf-8", "replace")
            results.append({"config": c.to_dict(), "bytes_sent_by_worker": sent_by_worker, **out})
    if comm.rank == 0:
        (run.path / "result.json").write_text(json.dumps(results))


def generate(cfg: GenerateConfig, modes: list[dict] | None = None) -> list[dict[str, Any]]:
    """Run cfg on cfg.workers local processes (or this one); one result per mode (default: one)."""
    from lowband.launch import launch_local

    validate_generate(cfg)
    for override in modes or []:
        validate_generate(GenerateConfig.from_dict({**cfg.to_dict(), **override}))
    with tempfile.TemporaryDirectory(prefix="lowband-generate-") as tmp:
        worker = functools.partial(generate_worker, modes=modes)
        launch_local(cfg, RunDir(tmp), False, worker=worker)
        return json.loads((Path(tmp) / "result.json").read_text())
