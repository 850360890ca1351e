"""Tensor-parallel inference (TPI-LLM; Megatron-style split), one worker's shard.

Worker r of W owns query heads [r H/W, (r+1) H/W) (rows of wq, columns of wo), the kv heads they
read (W <= K: K/W of them; W > K: one, shared by W/K workers), FFN columns [r F/W, (r+1) F/W)
(rows of w1, w3; columns of w2). Embedding, norms and output head are replicated. Each layer
all-reduces two B x L x E partial sums (after wo, after w2); docs/inference.md, section 2.

Shape suffixes as in lowband/models/llama.py; Hr, Kr, Fr: this worker's heads, kv heads, columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowband.models.llama import (
    KVCache,
    Transformer,
    apply_rotary,
    attend_cached,
    rotary_tables,
)
from lowband.serve.config import check_tp_split


class _ShardLayer(nn.Module):
    def __init__(
        self, block: nn.Module, heads: slice, kv_heads: slice, cols: slice, D: int
    ) -> None:
        super().__init__()
        a, f = block.attention, block.feed_forward

        def rows(w: Tensor, s: slice, size: int = 1) -> Tensor:
            return w[s.start * size : s.stop * size].clone()

        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self.wq = rows(a.wq.weight, heads, D)
        self.wk = rows(a.wk.weight, kv_heads, D)
        self.wv = rows(a.wv.weight, kv_heads, D)
        self.wo = a.wo.weight[:, heads.start * D : heads.stop * D].clone()
        self.w1, self.w3 = rows(f.w1.weight, cols), rows(f.w3.weight, cols)
        self.w2 = f.w2.weight[:, cols].clone()


class TPShard(nn.Module):
    """Worker `rank`'s part of `model`; `forward_cached` all-reduces through `all_reduce(t)`."""

    def __init__(
        self, model: Transformer, rank: int, world: int, all_reduce: Callable[[Tensor], None]
    ) -> None:
        super().__init__()
        cfg = model.cfg
        H, K, D, Fd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        check_tp_split(H, K, Fd, world)
        self.cfg, self.all_reduce, self.D = cfg, all_reduce, D
        self.Hr = H // world
        heads = slice(rank * self.Hr, (rank + 1) * self.Hr)
        group = H // K  # query heads per kv head
        kv = slice(heads.start // group, (heads.stop - 1) // group + 1)
        self.Kr = kv.stop - kv.start
        Fr = Fd // world
        cols = slice(rank * Fr, (rank + 1) * Fr)
        self.tok_embeddings, self.norm, self.output = model.tok_embeddings, model.norm, model.output
        self.layers = nn.ModuleList(_ShardLayer(b, heads, kv, cols, D) for b in model.layers)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.output.weight
        return KVCache(
            len(self.layers), batch, self.Kr, max_len, self.D, dtype=w.dtype, device=w.device
        )

    def forward_cached(self, tokens_BL: Tensor, cache: KVCache) -> Tensor:
        B, L = tokens_BL.shape
        D = self.D
        positions_BL = torch.arange(cache.length, cache.length + L, device=tokens_BL.device)[
            None
        ].expand(B, L)
        if cache.pad_B is not None:  # left-padded rows (served batches) start at 0
            positions_BL = (positions_BL - cache.pad_B.to(tokens_BL.device)[:, None]).clamp(min=0)
        cos_B1LD, sin_B1LD = rotary_tables(positions_BL, D, self.cfg.rope_theta)
        h_BLE = self.tok_embeddings(tokens_BL)
        for i, lay in enumerate(self.layers):
            x_BLE = lay.attention_norm(h_BLE)
            q_BHLD = F.linear(x_BLE, lay.wq).view(B, L, self.Hr, D).transpose(1, 2)
            k_BKLD = F.linear(x_BLE, lay.wk).view(B, L, self.Kr, D).transpose(1, 2)
            v_BKLD = F.linear(x_BLE, lay.wv).view(B, L, self.Kr, D).transpose(1, 2)
            q_BHLD = apply_rotary(q_BHLD, cos_B1LD, sin_B1LD)
            k_BKTD, v_BKTD = cache.append(i, apply_rotary(k_BKLD, cos_B1LD, sin_B1LD), v_BKLD)
            out_BHLD = attend_cached(q_BHLD, k_BKTD, v_BKTD, cache.length, cache.pad_B)
            part_BLE = F.linear(out_BHLD.transpose(1, 2).reshape(B, L, -1), lay.wo)
            self.all_reduce(part_BLE)  # the sum over workers' heads
            h_BLE = h_BLE + part_BLE
            x_BLE = lay.ffn_norm(h_BLE)
            part_BLE = F.linear(F.silu(F.linear(x_BLE, lay.w1)) * F.linear(x_BLE, lay.w3), lay.w2)
            self.all_reduce(part_BLE)  # the sum over workers' FFN columns
            h_BLE = h_BLE + part_BLE
        cache.length += L
        return self.output(self.norm(h_BLE))
