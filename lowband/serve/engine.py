"""One request, one process: the model with its cache, the decode loop, its timings, the text sink.

A *decoder* is any callable `decoder(tokens_BL) -> logits_BLV` that keeps its own KV cache: each
call feeds the tokens that follow the ones it has seen. `decode_loop` drives one (prefill with the
prompt, then one token at a time) and times it; tensor parallel (lowband.serve.tp) plugs in a
decoder whose layers all-reduce, pipeline parallel (lowband.serve.pp) has its own loop.
"""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lowband.errors import ConfigError
from lowband.serve.config import GenerateConfig
from lowband.serve.sampling import Sampler

VOCAB = 256  # byte-level tokens, as in training


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def load_model(cfg: GenerateConfig, device: torch.device | str) -> nn.Module:
    """The model to generate with: a preset or hf: model, fresh from --seed or --init's weights
    (lowband.zo.models.build_for_finetune), in eval mode."""
    from lowband.zo.models import build_for_finetune

    model = build_for_finetune(cfg.model, VOCAB, cfg.seed, device, cfg.init)
    if cfg.dtype == "bf16":  # weights, hence the KV cache and every message, in bf16
        model = model.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


class CachedModel:
    """Decoder over a lowband Transformer (or a TPShard): `forward_cached` with a KVCache."""

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        self.model, self.cache = model, model.new_cache(batch, max_len)

    @torch.no_grad()
    def __call__(self, tokens_BL: Tensor) -> Tensor:
        return self.model.forward_cached(tokens_BL, self.cache)


class HFCached:
    """Decoder over a transformers causal LM (lowband.zo.models.HFCausalLM): its own DynamicCache."""

    def __init__(self, model: nn.Module) -> None:
        from transformers import DynamicCache

        self.hf, self.cache = model.hf, DynamicCache()

    @torch.no_grad()
    def __call__(self, tokens_BL: Tensor) -> Tensor:
        out = self.hf(input_ids=tokens_BL, past_key_values=self.cache, use_cache=True)
        return out.logits


def make_decoder(model: nn.Module, batch: int, max_len: int) -> Callable[[Tensor], Tensor]:
    if hasattr(model, "forward_cached"):
        return CachedModel(model, batch, max_len)
    if hasattr(model, "hf"):
        return HFCached(model)
    raise ConfigError(f"cannot generate with a {type(model).__name__}")


class TextSink:
    """Streams tokens to a text stream as they come: bytes decoded incrementally (a multi-byte
    character prints once complete; invalid bytes as U+FFFD)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> None:
        text = self._decoder.decode(bytes([token]) if 0 <= token < VOCAB else b"\xff")
        if text:
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self.stream.write(self._decoder.decode(b"", final=True) + "\n")
        self.stream.flush()


def timings(t0: float, stamps: list[float]) -> dict[str, Any]:
    """TTFT, TBT (mean, p50, max) and tokens/s from the start time and each token's time."""
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    total = stamps[-1] - t0
    return {
        "ttft_s": stamps[0] - t0,
        "tbt_mean_s": sum(gaps) / len(gaps) if gaps else None,
        "tbt_p50_s": gaps[len(gaps) // 2] if gaps else None,
        "tbt_max_s": gaps[-1] if gaps else None,
        "total_s": total,
        "tokens_per_s": len(stamps) / total if total > 0 else None,
    }


def decode_loop(
    decoder: Callable[[Tensor], Tensor],
    prompt_BL: Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    on_token: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Prefill with the prompt, then decode one token at a time; the new tokens and timings.

    Every tensor-parallel worker runs this loop on identical logits with an identically seeded
    sampler, so all choose the same tokens without exchanging them.
    """
    device = prompt_BL.device
    t0 = time.perf_counter()
    tokens: list[list[int]] = []
    stamps: list[float] = []
    feed_BL = prompt_BL
    for _ in range(max_new_tokens):
        next_B = sampler(decoder(feed_BL)[:, -1])
        feed_BL = next_B.to(device)[:, None]
        stamps.append(time.perf_counter())
        tokens.append(next_B.tolist())
        if on_token is not None:
            on_token(int(next_B[0]))
    return {"tokens": [list(row) for row in zip(*tokens)], **timings(t0, stamps)}


def generate_local(
    model: nn.Module, cfg: GenerateConfig, on_token: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """One request on one process: cfg.prompt -> cfg.max_new_tokens tokens."""
    device = next(model.parameters()).device
    prompt_BL = torch.tensor([encode(cfg.prompt)], device=device)
    decoder = make_decoder(model, 1, prompt_BL.shape[1] + cfg.max_new_tokens)
    return decode_loop(
        decoder,
        prompt_BL,
        cfg.max_new_tokens,
        Sampler(cfg.temperature, cfg.top_p, cfg.seed),
        on_token,
    )


class Cancelled(Exception):
    """Raised by a request's token callback when its client has gone: the request stops."""


@torch.no_grad()
def generate_batch(
    model: nn.Module, cfgs: list[GenerateConfig], on_tokens: list[Callable[[int], None]]
) -> list[dict[str, Any] | Exception]:
    """Several requests in one batch (the server's concurrent requests): prompts left-padded to
    the longest (KVCache.pad_B masks the padding and shifts each row's positions), one forward
    per step for all rows, each row with its own seeded sampler and its own max_new_tokens.
    Per request: its tokens and timings, or the Cancelled raised by its callback (that row stops;
    the others go on). Each row's tokens are what it would get alone (tested), up to the last
    bits of the batched matmuls."""
    prompts = [encode(c.prompt) for c in cfgs]
    B, L = len(cfgs), max(map(len, prompts))
    device = next(model.parameters()).device
    pad_B = torch.tensor([L - len(p) for p in prompts])
    x_BL = torch.tensor([[0] * int(pad_B[b]) + p for b, p in enumerate(prompts)], device=device)
    n_max = max(c.max_new_tokens for c in cfgs)
    cache = model.new_cache(B, L + n_max)
    cache.pad_B = pad_B if bool(pad_B.any()) else None
    samplers = [Sampler(c.temperature, c.top_p, c.seed) for c in cfgs]
    tokens: list[list[int]] = [[] for _ in cfgs]
    stamps: list[list[float]] = [[] for _ in cfgs]
    failed: list[Exception | None] = [None] * B
    t0 = time.perf_counter()
    feed_BL = x_BL
    for step in range(n_max):
        logits_BV = model.forward_cached(feed_BL, cache)[:, -1]
        nxt = [0] * B
        for b in range(B):
            if failed[b] is not None or step >= cfgs[b].max_new_tokens:
                continue
            nxt[b] = int(samplers[b](logits_BV[b : b + 1])[0])
            tokens[b].append(nxt[b])
            stamps[b].append(time.perf_counter())
            try:
                on_tokens[b](nxt[b])
            except Cancelled as e:
                failed[b] = e
        live = [b for b in range(B) if failed[b] is None and step + 1 < cfgs[b].max_new_tokens]
        if not live:
            break
        feed_BL = torch.tensor(nxt, device=device)[:, None]
    return [
        failed[b] if failed[b] is not None else {"tokens": [tokens[b]], **timings(t0, stamps[b])}
        for b in range(B)
    ]
