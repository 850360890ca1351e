"""Pipeline-parallel inference: layers split into stages, one stage per worker (the baseline
TPI-LLM argues against for one user), with micro-batches for several requests.
docs/inference.md, section 3.

Stage s of W owns layers [first_s, first_{s+1}) (the first N % W stages one more); stage 0 also
the embedding, the last stage the final norm, the output head and the sampler. The requests are
dealt into M micro-batches (one request each by default), each with its own KV cache on every
stage. Step i = 0, 1, ... (the prompts, then one token at a time), micro-batch m = 0 .. M-1:
    1. stage 0 takes micro-batch m's token of step i - 1 from the last stage (the prompt at
       i = 0), embeds it and runs its layers on m's cache;
    2. stage s sends h (B_m x L x E) to stage s + 1 without waiting for it to arrive, and goes on
       to micro-batch m + 1: while m is on stage s + 1, m + 1 is on stage s (the pipeline full);
    3. the last stage samples each row with its request's sampler and sends the tokens (B_m int64)
       to stage 0, which streams them.
With one micro-batch only one stage computes at a time; with M >= W every stage has work.
No deadlock: every stage handles (i, m) in the same lexicographic order; sends are asynchronous
(waited on later, in order), so a stage only ever blocks on a receive whose sender, earlier in
that order, needs nothing from it: stage 0's (i, m) needs the last stage's (i - 1, m), which
needs stage 0's (i - 1, m), already sent. Each stage runs exactly the single-process operations
on the same shapes, so one request per micro-batch gives logits bit-identical to one process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lowband.comm import Comm
from lowband.models.llama import KVCache, Transformer, rotary_tables
from lowband.serve.engine import timings
from lowband.serve.requests import Request, record, summarize
from lowband.serve.sampling import Sampler


def stage_layers(n_layers: int, stages: int, s: int) -> range:
    base, extra = divmod(n_layers, stages)
    first = s * base + min(s, extra)
    return range(first, first + base + (1 if s < extra else 0))


class Stage(nn.Module):
    """Stage `s` of `stages`: its layers (shared with `model`) and, at the ends, embed or head."""

    def __init__(self, model: Transformer, s: int, stages: int) -> None:
        super().__init__()
        self.cfg, self.first, self.last = model.cfg, s == 0, s == stages - 1
        self.layers = nn.ModuleList(
            model.layers[i] for i in stage_layers(model.cfg.n_layers, stages, s)
        )
        self.tok_embeddings = model.tok_embeddings if self.first else None
        self.norm, self.output = (model.norm, model.output) if self.last else (None, None)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        w = self.layers[0].attention.wq.weight
        return KVCache(
            len(self.layers),
            batch,
            c.n_kv_heads,
            max_len,
            c.head_dim,
            dtype=w.dtype,
            device=w.device,
        )

    @torch.no_grad()
    def forward_cached(self, x: Tensor, cache: KVCache) -> Tensor:
        """x: tokens B x L (stage 0) or h B x L x E; returns h, or logits at the last stage."""
        B, L = x.shape[:2]
        positions_BL = torch.arange(cache.length, cache.length + L, device=x.device)[None].expand(
            B, L
        )
        if cache.pad_B is not None:  # a left-padded row counts from its first token
            positions_BL = (positions_BL - cache.pad_B.to(x.device)[:, None]).clamp(min=0)
        cos_B1LD, sin_B1LD = rotary_tables(positions_BL, self.cfg.head_dim, self.cfg.rope_theta)
        h_BLE = self.tok_embeddings(x) if self.first else x
        for j, layer in enumerate(self.layers):
            h_BLE = layer.forward_cached(h_BLE, cos_B1LD, sin_B1LD, cache, j)
        cache.length += L
        return self.output(self.norm(h_BLE)) if self.last else h_BLE


class MicroBatch:
    """Requests decoded together through the pipeline: their prompts left-padded to the longest
    (the padding masked through `KVCache.pad_B`, as in lowband.serve.engine.generate_batch)."""

    def __init__(self, requests: list[Request], stage: Stage, max_new_tokens: int, device) -> None:
        self.requests = requests
        L = max(len(r.prompt) for r in requests)
        pads = [L - len(r.prompt) for r in requests]
        self.prompt_BL = torch.tensor(
            [[0] * p + r.prompt for p, r in zip(pads, requests)], device=device
        )
        self.cache = stage.new_cache(len(requests), L + max_new_tokens)
        self.cache.pad_B = torch.tensor(pads) if any(pads) else None
        self.token_B = torch.zeros(len(requests), dtype=torch.int64, device=device)


def pp_pipeline(
    stage: Stage,
    comm: Comm,
    batches: list[list[Request]],
    max_new_tokens: int,
    samplers: dict[int, Sampler],
    on_token: Callable[[int, int], None] | None = None,
) -> tuple[float, dict[int, tuple[list[int], list[float]]]] | None:
    """Steps 1-3 above on every stage. On stage 0: the start time and, per request id, its tokens
    and the times they reached stage 0; None on the other stages."""
    s, n = comm.rank, comm.size
    device = next(stage.parameters()).device
    dtype = stage.layers[0].attention.wq.weight.dtype
    E = stage.cfg.dim
    mbs = [MicroBatch(b, stage, max_new_tokens, device) for b in batches]
    out: dict[int, tuple[list[int], list[float]]] = {r.id: ([], []) for b in batches for r in b}
    pending: deque = deque()  # (Work, tensor) of sends not yet waited on, oldest first

    def send(t: Tensor, dst: int) -> None:
        pending.append((comm.send(t, dst, async_op=True), t))
        while len(pending) > 2 * len(mbs):  # bounded: the buffers of two steps in flight
            pending.popleft()[0].wait()

    def take_tokens(mb: MicroBatch) -> None:  # stage 0: the tokens of mb's last step
        if n > 1:
            comm.recv(mb.token_B, n - 1)
        now = time.perf_counter()
        for b, r in enumerate(mb.requests):
            tokens, stamps = out[r.id]
            tokens.append(int(mb.token_B[b]))
            stamps.append(now)
            if on_token is not None:
                on_token(r.id, tokens[-1])

    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        for mb in mbs:
            B, L = mb.prompt_BL.shape if i == 0 else (mb.prompt_BL.shape[0], 1)
            if stage.first:
                if i > 0:
                    take_tokens(mb)  # 1.
                x = mb.prompt_BL if i == 0 else mb.token_B[:, None].clone()
            else:
                x = torch.empty(B, L, E, dtype=dtype, device=device)
                comm.recv(x, s - 1)
            y = stage.forward_cached(x, mb.cache)
            if not stage.last:
                send(y.contiguous(), s + 1)  # 2.
                continue
            token_B = torch.stack(  # 3.
                [samplers[r.id](y[b : b + 1, -1])[0] for b, r in enumerate(mb.requests)]
            ).to(device)
            if n > 1:
                send(token_B, 0)
            else:
                mb.token_B = token_B
    if stage.first:
        for mb in mbs:
            take_tokens(mb)
    while pending:
        pending.popleft()[0].wait()
    return (t0, out) if stage.first else None


def pp_decode_loop(
    stage: Stage,
    comm: Comm,
    prompt_BL: Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    on_token: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """One request (a batch of prompts of one length): its tokens and timings on stage 0."""
    reqs = [Request(b, row, 0.0, 0) for b, row in enumerate(prompt_BL.tolist())]
    samplers = {r.id: sampler for r in reqs}  # one batch, one generator: as one process draws
    if len(reqs) > 1:
        raise ValueError("pp_decode_loop serves one prompt; several go through pp_requests")
    done = pp_pipeline(
        stage, comm, [reqs], max_new_tokens, samplers,
        None if on_token is None else (lambda _, t: on_token(t)),
    )  # fmt: skip
    if done is None:
        return None
    t0, out = done
    tokens, stamps = out[0]
    return {"tokens": [tokens], **timings(t0, stamps)}


def pp_requests(
    stage: Stage,
    comm: Comm,
    requests: list[Request],
    micro_batches: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    on_token: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """Several requests through the pipeline, dealt round-robin into `micro_batches` (0: one
    each); per-request and overall figures on stage 0 (lowband.serve.requests.summarize)."""
    m = micro_batches or len(requests)
    batches = [requests[j::m] for j in range(m)]
    samplers = {r.id: Sampler(temperature, top_p, r.seed) for r in requests}
    done = pp_pipeline(stage, comm, batches, max_new_tokens, samplers, on_token)
    if done is None:
        return None
    t0, out = done
    return summarize([record(r, t0, out[r.id][1], out[r.id][0]) for r in requests])
