"""Pipeline-parallel inference: layers split into stages, one stage per worker (the baseline
TPI-LLM argues against for one user). docs/inference.md, section 3.

Stage s of W owns layers [first_s, first_{s+1}) (the first N % W stages one more); stage 0 also
the embedding, the last stage the final norm, the output head and the sampler. One token:
    1. stage 0 embeds (the prompt, then the last token) and runs its layers on its own cache;
    2. stage s sends h (B x L x E) to stage s + 1;
    3. the last stage samples and sends the token (B int64) to stage 0, which streams it.
No deadlock: every send has its receive posted by the next stage in the same step, and stage 0
waits for the token before it starts the next step. Each stage runs exactly the single-process
operations on the same shapes, so the logits are bit-identical to one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lowband.comm import Comm
from lowband.models.llama import KVCache, Transformer, rotary_tables
from lowband.serve.engine import timings
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
        cos_B1LD, sin_B1LD = rotary_tables(positions_BL, self.cfg.head_dim, self.cfg.rope_theta)
        h_BLE = self.tok_embeddings(x) if self.first else x
        for j, layer in enumerate(self.layers):
            h_BLE = layer.forward_cached(h_BLE, cos_B1LD, sin_B1LD, cache, j)
        cache.length += L
        return self.output(self.norm(h_BLE)) if self.last else h_BLE


def pp_decode_loop(
    stage: Stage,
    comm: Comm,
    prompt_BL: Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    on_token: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """Steps 1-3 above, on every stage; stage 0 returns the tokens and timings, the others None."""
    s, n = comm.rank, comm.size
    B, L0 = prompt_BL.shape
    E, device = stage.cfg.dim, prompt_BL.device
    dtype = stage.layers[0].attention.wq.weight.dtype
    cache = stage.new_cache(B, L0 + max_new_tokens)
    token_B = torch.zeros(B, dtype=torch.int64, device=device)
    tokens: list[list[int]] = []
    stamps: list[float] = []
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        L = L0 if i == 0 else 1
        if stage.first:
            x = prompt_BL if i == 0 else token_B[:, None]
        else:
            x = torch.empty(B, L, E, dtype=dtype, device=device)
            comm.recv(x, s - 1)  # 2. from the previous stage
        y = stage.forward_cached(x, cache)
        if not stage.last:
            comm.send(y.contiguous(), s + 1)
        else:
            token_B = sampler(y[:, -1]).to(device)
            if n > 1:
                comm.send(token_B, 0)  # 3. back to stage 0
        if stage.first:
            if n > 1:
                comm.recv(token_B, n - 1)
            stamps.append(time.perf_counter())
            tokens.append(token_B.tolist())
            if on_token is not None:
                on_token(int(token_B[0]))
    if not stage.first:
        return None
    return {"tokens": [list(row) for row in zip(*tokens)], **timings(t0, stamps)}
