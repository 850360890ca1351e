"""Prefill and decode on different workers (Splitwise): worker 1 runs the prompt, worker 0 decodes.

docs/inference.md, section 5. One request:
    1. worker 1 (prefill) runs the prompt layer by layer; as soon as layer i's keys and values
       exist it sends them to worker 0 (one message, 2 x B x K x L x D, async), while layer i + 1
       computes: the transfer overlaps the rest of the prefill (Splitwise's layer-wise transfer);
    2. after the last layer worker 1 samples the first token and sends it;
    3. worker 0 (decode) receives the N layers' caches into its own KV cache, then the first
       token (TTFT), and decodes the rest alone; when sampling, worker 1 also sends its sampler's
       generator state (5 KB), so worker 0 draws what one process would.
No deadlock: worker 0 receives in the order worker 1 sends (layers 0..N-1, then the token).
Logits are the single-process ones bit for bit: the same operations on the same shapes.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.models.llama import Transformer, rotary_tables
from lowband.serve.engine import timings
from lowband.serve.sampling import Sampler


def check_splitwise(workers: int) -> None:
    if workers != 2:
        raise ConfigError(
            f"--parallel splitwise runs 2 workers (0 decodes, 1 prefills), got --workers {workers}"
        )


@torch.no_grad()
def prefill_worker(
    model: Transformer, comm: Comm, prompt_BL: Tensor, sampler: Sampler, max_len: int
) -> None:
    """Steps 1-2 on worker 1."""
    c = model.cfg
    B, L = prompt_BL.shape
    cache = model.new_cache(B, max_len)
    positions_BL = torch.arange(L, device=prompt_BL.device)[None].expand(B, L)
    cos_B1LD, sin_B1LD = rotary_tables(positions_BL, c.head_dim, c.rope_theta)
    h_BLE = model.tok_embeddings(prompt_BL)
    sends = []
    for i, layer in enumerate(model.layers):
        h_BLE = layer.forward_cached(h_BLE, cos_B1LD, sin_B1LD, cache, i)
        kv_2BKLD = torch.stack([cache.k[i][:, :, :L], cache.v[i][:, :, :L]])
        sends.append((comm.send(kv_2BKLD, 0, async_op=True), kv_2BKLD))  # 1. overlapped
    token_B = sampler(model.output(model.norm(h_BLE))[:, -1])
    sends.append((comm.send(token_B, 0, async_op=True), token_B))  # 2.
    if sampler.temperature > 0:
        state = sampler.generator.get_state()
        sends.append((comm.send(state, 0, async_op=True), state))
    for work, _ in sends:
        work.wait()


@torch.no_grad()
def decode_worker(
    model: Transformer,
    comm: Comm,
    prompt_BL: Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    on_token=None,
) -> dict[str, Any]:
    """Step 3 on worker 0: the new tokens and timings."""
    c = model.cfg
    B, L = prompt_BL.shape
    cache = model.new_cache(B, L + max_new_tokens)
    t0 = time.perf_counter()
    for i in range(c.n_layers):
        kv_2BKLD = torch.empty(2, B, c.n_kv_heads, L, c.head_dim, dtype=cache.k[i].dtype)
        comm.recv(kv_2BKLD, 1)
        cache.k[i][:, :, :L], cache.v[i][:, :, :L] = kv_2BKLD[0], kv_2BKLD[1]
    cache.length = L
    token_B = torch.empty(B, dtype=torch.int64)
    comm.recv(token_B, 1)
    if sampler.temperature > 0:  # continue from where worker 1's draw left the generator
        state = sampler.generator.get_state()
        comm.recv(state, 1)
        sampler.generator.set_state(state)
    tokens, stamps = [token_B.tolist()], [time.perf_counter()]
    if on_token is not None:
        on_token(int(token_B[0]))
    for _ in range(max_new_tokens - 1):
        token_B = sampler(model.forward_cached(token_B[:, None].to(prompt_BL.device), cache)[:, -1])
        stamps.append(time.perf_counter())
        tokens.append(token_B.tolist())
        if on_token is not None:
            on_token(int(token_B[0]))
    return {"tokens": [list(row) for row in zip(*tokens)], **timings(t0, stamps)}


def splitwise_generate(
    model: Transformer,
    comm: Comm,
    prompt_BL: Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    on_token=None,
) -> dict[str, Any] | None:
    check_splitwise(comm.size)
    if comm.rank == 1:
        prefill_worker(model, comm, prompt_BL, sampler, prompt_BL.shape[1] + max_new_tokens)
        return None
    return decode_worker(model, comm, prompt_BL, max_new_tokens, sampler, on_token)
