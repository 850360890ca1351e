"""Attention offloading (Lamina): worker 0 computes, workers 1..M hold the KV cache and attend.

docs/inference.md, section 6. Memory worker m (1 <= m <= M = W - 1) owns kv heads
[(m-1) K/M, m K/M) and the query heads that read them; it holds no weights at all, only their KV
cache. For every forward (the prompt, then each token) and every layer:
    1. worker 0 computes q, k, v (rotated) from its full weights, and sends memory worker m one
       message: its query heads, k and v stacked on the head axis, B x (Hm + 2 Km) x L x D;
    2. worker m appends k, v to its cache, attends its queries over it, sends back B x Hm x L x D;
    3. worker 0 concatenates the heads, applies wo and the FFN; the last layer's output gives the
       logits and worker 0 samples.
Bytes per token and layer: (H + 2K) D 4 out and H D 4 back, whatever the context length; the
cache's reads (2 K D T 4 per layer) stay on the memory workers. No deadlock: worker 0 sends to
every memory worker before receiving from any, and each memory worker receives, computes, sends,
in the same order of layers and steps as worker 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.models.llama import (
    KVCache,
    ModelConfig,
    Transformer,
    apply_rotary,
    attend_cached,
    rotary_tables,
)
from lowband.serve.engine import decode_loop
from lowband.serve.sampling import Sampler


def check_lamina_split(cfg: ModelConfig, workers: int) -> None:
    if workers < 2 or cfg.n_kv_heads % (workers - 1):
        raise ConfigError(
            f"--parallel lamina: --workers {workers} is 1 compute worker and {workers - 1} memory "
            f"workers, which must divide the model's {cfg.n_kv_heads} kv heads"
        )


class OffloadedModel:
    """Worker 0's decoder: everything but attention, which goes to the memory workers."""

    def __init__(self, model: Transformer, comm: Comm) -> None:
        self.model, self.comm, self.cfg = model, comm, model.cfg
        self.M = comm.size - 1
        self.length = 0

    @torch.no_grad()
    def __call__(self, tokens_BL: Tensor) -> Tensor:
        c, m = self.cfg, self.model
        B, L = tokens_BL.shape
        H, K, D, M = c.n_heads, c.n_kv_heads, c.head_dim, self.M
        Hm, Km = H // M, K // M
        positions_BL = torch.arange(self.length, self.length + L, device=tokens_BL.device)
        positions_BL = positions_BL[None].expand(B, L)
        cos_B1LD, sin_B1LD = rotary_tables(positions_BL, D, c.rope_theta)
        h_BLE = m.tok_embeddings(tokens_BL)
        for layer in m.layers:
            a = layer.attention
            x_BLE = layer.attention_norm(h_BLE)
            q_BHLD = apply_rotary(a.wq(x_BLE).view(B, L, H, D).transpose(1, 2), cos_B1LD, sin_B1LD)
            k_BKLD = apply_rotary(a.wk(x_BLE).view(B, L, K, D).transpose(1, 2), cos_B1LD, sin_B1LD)
            v_BKLD = a.wv(x_BLE).view(B, L, K, D).transpose(1, 2)
            sends, outs = [], []
            for j in range(M):  # 1.
                msg = torch.cat(
                    [
                        q_BHLD[:, j * Hm : (j + 1) * Hm],
                        k_BKLD[:, j * Km : (j + 1) * Km],
                        v_BKLD[:, j * Km : (j + 1) * Km],
                    ],
                    dim=1,
                ).contiguous()
                sends.append(self.comm.send(msg, j + 1, async_op=True))
            for j in range(M):
                outs.append(torch.empty(B, Hm, L, D, dtype=q_BHLD.dtype, device=q_BHLD.device))
                self.comm.recv(outs[-1], j + 1)  # 2. (on the memory worker)
            for w in sends:
                w.wait()
            out_BHLD = torch.cat(outs, dim=1)  # 3.
            h_BLE = h_BLE + a.wo(out_BHLD.transpose(1, 2).reshape(B, L, -1))
            h_BLE = h_BLE + layer.feed_forward(layer.ffn_norm(h_BLE))
        self.length += L
        return m.output(m.norm(h_BLE))


@torch.no_grad()
def memory_worker_loop(
    cfg: ModelConfig,
    comm: Comm,
    batch: int,
    prompt_len: int,
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> None:
    """Step 2 on memory worker comm.rank, for the prompt and then max_new_tokens - 1 tokens;
    the cache and the messages in the compute worker's `dtype`, on this worker's `device`."""
    M = comm.size - 1
    Hm, Km, D = cfg.n_heads // M, cfg.n_kv_heads // M, cfg.head_dim
    cache = KVCache(
        cfg.n_layers, batch, Km, prompt_len + max_new_tokens, D, dtype=dtype, device=device
    )
    for step in range(max_new_tokens):
        L = prompt_len if step == 0 else 1
        for i in range(cfg.n_layers):
            msg = torch.empty(batch, Hm + 2 * Km, L, D, dtype=dtype, device=device)
            comm.recv(msg, 0)
            q_BHLD, k_BKLD, v_BKLD = msg.split([Hm, Km, Km], dim=1)
            k_BKTD, v_BKTD = cache.append(i, k_BKLD, v_BKLD)
            comm.send(attend_cached(q_BHLD, k_BKTD, v_BKTD, cache.length).contiguous(), 0)
        cache.length += L


def lamina_generate(
    model: Transformer,
    comm: Comm,
    prompt_BL: Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    on_token=None,
) -> dict[str, Any] | None:
    """One request; the result on worker 0, None on the memory workers."""
    check_lamina_split(model.cfg, comm.size)
    if comm.rank == 0:
        return decode_loop(
            OffloadedModel(model, comm), prompt_BL, max_new_tokens, sampler, on_token
        )
    memory_worker_loop(
        model.cfg,
        comm,
        prompt_BL.shape[0],
        prompt_BL.shape[1],
        max_new_tokens,
        model.output.weight.dtype,
        model.output.weight.device,
    )
    return None
