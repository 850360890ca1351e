"""A small Llama-style decoder: pre-norm RMSNorm, rotary positions, SwiGLU, grouped-query attention.

Untied input embedding and output head, no biases. Attention is pluggable (`attn_fn`) so that
sequence-parallel attention can replace it later; rotary embeddings are therefore applied *before*
`attn_fn`, and `forward` takes the true positions of the tokens it is given (`positions_BL`), so a
sequence shard rotates its queries and keys as it would inside the full sequence.

Shape suffixes:
    B  batch
    L  sequence length (of this shard, when the sequence is split)
    H  query heads
    K  key/value heads (H % K == 0; each group of H // K query heads shares one kv head)
    D  head dimension (dim // H)
    E  model dimension (ModelConfig.dim)
    F  feed-forward hidden dimension
    V  vocabulary size
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowband.errors import ConfigError

# normal(0, INIT_STD) for every linear and embedding weight, as in GPT-2 / Llama reference code.
INIT_STD = 0.02


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of a Transformer. Checked on construction; a bad value raises ConfigError."""

    dim: int
    """Model (residual stream) width E."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads H; head_dim = dim // n_heads."""
    n_kv_heads: int
    """Key/value heads K for grouped-query attention; n_heads % n_kv_heads == 0 (K == H is plain MHA)."""
    ffn_dim: int
    """Hidden width F of the SwiGLU feed-forward (w1 and w3 project E -> F, w2 projects F -> E)."""
    vocab_size: int = 256
    """Vocabulary size V; 256 for byte-level tokens."""
    max_seq_len: int = 4096
    """Longest sequence `forward` accepts when positions are implicit (arange(L))."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (RoFormer, Su et al. 2021)."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = (int,) if f.type in ("int", int) else (int, float)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise ConfigError(f"model config: {f.name} must be a {f.type}, got {value!r}")
            if not value > 0:
                raise ConfigError(f"model config: {f.name} must be positive, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            # RoPE rotates pairs of channels.
            raise ConfigError(f"model config: head_dim dim/n_heads = {self.head_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of `Transformer(cfg)`, from the config alone (no allocation)."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    attn = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim  # wq, wo; wk, wv
    ffn = 3 * cfg.dim * cfg.ffn_dim  # w1, w2, w3
    norms = 2 * cfg.dim  # attention_norm, ffn_norm
    embed_and_head = 2 * cfg.vocab_size * cfg.dim  # untied
    return cfg.n_layers * (attn + ffn + norms) + embed_and_head + cfg.dim  # + final norm


class AttnFn(Protocol):
    """Attention on rotated queries/keys; k and v have K heads and the function handles GQA."""

    def __call__(
        self, q_BHLD: Tensor, k_BKLD: Tensor, v_BKLD: Tensor, /, *, causal: bool
    ) -> Tensor: ...


def sdpa_attention(q_BHLD: Tensor, k_BKLD: Tensor, v_BKLD: Tensor, *, causal: bool) -> Tensor:
    """Default AttnFn: PyTorch's fused attention, which repeats kv heads itself (enable_gqa)."""
    return F.scaled_dot_product_attention(q_BHLD, k_BKLD, v_BKLD, is_causal=causal, enable_gqa=True)


class KVCache:
    """Keys (rotated) and values of the tokens seen so far, for generation (docs/inference.md).

    Per layer a preallocated B x K x max_len x D buffer for k and one for v; `length` tokens are
    filled. `Transformer.forward_cached` appends the new tokens and advances `length`.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.pad_B: Tensor | None = None
        """Left padding of each row (a batch of prompts of different lengths): row b's slots
        [0, pad_B[b]) hold no token; its positions start at 0 after them. None: no padding."""

    def append(self, layer: int, k_BKLD: Tensor, v_BKLD: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens' k and v at [length, length + L); return views of [0, length + L)."""
        end = self.length + k_BKLD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} needed")
        self.k[layer][:, :, self.length : end] = k_BKLD
        self.v[layer][:, :, self.length : end] = v_BKLD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def attend_cached(
    q_BHLD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, start: int, pad_B: Tensor | None = None
) -> Tensor:
    """Attention of L new queries at positions start.. over all T = start + L cached keys.

    L == 1 needs no mask; start == 0 is the training mask (is_causal); otherwise query i may see
    slots <= start + i (SDPA's is_causal aligns its triangle top-left, wrong for an offset).
    With left padding (pad_B) row b's queries also skip slots < pad_B[b]; a padding query sees
    itself only (its output is never used, but must not be NaN).
    """
    L, T = q_BHLD.shape[2], k_BKTD.shape[2]
    if pad_B is None and (L == 1 or start == 0):
        return sdpa_attention(q_BHLD, k_BKTD, v_BKTD, causal=L > 1)
    slot_T = torch.arange(T, device=q_BHLD.device)
    query_L = start + torch.arange(L, device=q_BHLD.device)
    mask = slot_T[None] <= query_L[:, None]  # L x T
    if pad_B is not None:
        real_B1T = slot_T[None, None] >= pad_B.to(q_BHLD.device)[:, None, None]
        mask = (mask[None] & real_B1T) | (slot_T[None] == query_L[:, None])[None]
        mask = mask[:, None]  # B x 1 x L x T, broadcast over heads
    return F.scaled_dot_product_attention(q_BHLD, k_BKTD, v_BKTD, attn_mask=mask, enable_gqa=True)


def rotary_tables(positions_BL: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, fp32, shaped B x 1 x L x D to broadcast over heads.

    Computed from the positions on every call rather than sliced from a precomputed table: it is
    cheap (once per forward, shared by all layers), works for any offset a sequence shard has,
    and leaves no buffer that `.to(bfloat16)` would round.
    """
    inv_freq_D2 = theta ** (
        -torch.arange(0, head_dim, 2, device=positions_BL.device, dtype=torch.float32) / head_dim
    )
    angles_BLD2 = positions_BL.to(torch.float32)[..., None] * inv_freq_D2
    # rotate-half layout: channel i pairs with channel i + D/2, so both halves share the angle.
    angles_BLD = torch.cat([angles_BLD2, angles_BLD2], dim=-1)
    return angles_BLD.cos()[:, None], angles_BLD.sin()[:, None]


def apply_rotary(x_BHLD: Tensor, cos_B1LD: Tensor, sin_B1LD: Tensor) -> Tensor:
    """Rotate each (i, i + D/2) channel pair of x by its position's angle; math in fp32."""
    x = x_BHLD.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos_B1LD + rotated * sin_B1LD).to(x_BHLD.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x_BLE: Tensor) -> Tensor:
        x = x_BLE.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x_BLE) * self.weight


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, dtype=torch.float32)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = _linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = _linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = _linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = _linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.attn_fn = attn_fn

    def forward(self, x_BLE: Tensor, cos_B1LD: Tensor, sin_B1LD: Tensor) -> Tensor:
        B, L, _ = x_BLE.shape
        q_BHLD = self.wq(x_BLE).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKLD = self.wk(x_BLE).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BKLD = self.wv(x_BLE).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # Rotate before attn_fn: a sequence-parallel attn_fn moves k/v between ranks, and they
        # must already carry their own positions when they arrive.
        q_BHLD = apply_rotary(q_BHLD, cos_B1LD, sin_B1LD)
        k_BKLD = apply_rotary(k_BKLD, cos_B1LD, sin_B1LD)
        out_BHLD = self.attn_fn(q_BHLD, k_BKLD, v_BKLD, causal=True)
        return self.wo(out_BHLD.transpose(1, 2).reshape(B, L, -1))

    def forward_cached(
        self, x_BLE: Tensor, cos_B1LD: Tensor, sin_B1LD: Tensor, cache: KVCache, layer: int
    ) -> Tensor:
        """`forward` for generation: append this layer's k, v to `cache` and attend over it."""
        B, L, _ = x_BLE.shape
        q_BHLD = self.wq(x_BLE).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKLD = self.wk(x_BLE).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BKLD = self.wv(x_BLE).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHLD = apply_rotary(q_BHLD, cos_B1LD, sin_B1LD)
        k_BKTD, v_BKTD = cache.append(layer, apply_rotary(k_BKLD, cos_B1LD, sin_B1LD), v_BKLD)
        out_BHLD = attend_cached(q_BHLD, k_BKTD, v_BKTD, cache.length, cache.pad_B)
        return self.wo(out_BHLD.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = _linear(cfg.dim, cfg.ffn_dim)
        self.w2 = _linear(cfg.ffn_dim, cfg.dim)
        self.w3 = _linear(cfg.dim, cfg.ffn_dim)

    def forward(self, x_BLE: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x_BLE)) * self.w3(x_BLE))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attn_fn)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, h_BLE: Tensor, cos_B1LD: Tensor, sin_B1LD: Tensor) -> Tensor:
        h_BLE = h_BLE + self.attention(self.attention_norm(h_BLE), cos_B1LD, sin_B1LD)
        return h_BLE + self.feed_forward(self.ffn_norm(h_BLE))

    def forward_cached(
        self, h_BLE: Tensor, cos_B1LD: Tensor, sin_B1LD: Tensor, cache: KVCache, layer: int
    ) -> Tensor:
        attn = self.attention.forward_cached(
            self.attention_norm(h_BLE), cos_B1LD, sin_B1LD, cache, layer
        )
        h_BLE = h_BLE + attn
        return h_BLE + self.feed_forward(self.ffn_norm(h_BLE))


class Transformer(nn.Module):
    """Decoder-only Llama-style language model.

    Parameters are fp32. They are allocated on the meta device first (so construction neither
    runs PyTorch's default init nor touches the global RNG), then materialised on CPU and drawn
    by `init_weights(seed)` from a private generator, then moved to the default device. Inside
    `with torch.device("meta")` they stay on meta, unallocated (for counting or deferred init).
    """

    def __init__(self, cfg: ModelConfig, attn_fn: AttnFn | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        target = torch.get_default_device()
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, dtype=torch.float32)
            fn = attn_fn if attn_fn is not None else sdpa_attention
            self.layers = nn.ModuleList(TransformerBlock(cfg, fn) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = _linear(cfg.dim, cfg.vocab_size)
        self.checkpoint_activations = False
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)
        instead of keeping them: memory for one block's worth, one more forward of compute."""
        if target.type != "meta":
            self.to_empty(device="cpu")
            self.init_weights(seed)
            if target.type != "cpu":
                self.to(target)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Redraw every parameter in place from `torch.Generator().manual_seed(seed)`.

        Draws happen on CPU in fp32 in a fixed order and are then copied into the parameters,
        so the values depend only on the seed and the config: not on the global RNG, the
        process, the parameters' device or their dtype (beyond the final rounding).
        """
        gen = torch.Generator().manual_seed(seed)
        # Residual-branch outputs get std / sqrt(2 * n_layers) so the residual stream's variance
        # does not grow with depth (GPT-2 paper, section 2.3): two branches per layer.
        out_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)

        def normal_(w: Tensor, std: float) -> None:
            w.copy_(torch.empty(w.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

        normal_(self.tok_embeddings.weight, INIT_STD)
        for layer in self.layers:
            layer.attention_norm.weight.fill_(1.0)
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                normal_(w.weight, INIT_STD)
            normal_(layer.attention.wo.weight, out_std)
            layer.ffn_norm.weight.fill_(1.0)
            normal_(layer.feed_forward.w1.weight, INIT_STD)
            normal_(layer.feed_forward.w3.weight, INIT_STD)
            normal_(layer.feed_forward.w2.weight, out_std)
        self.norm.weight.fill_(1.0)
        normal_(self.output.weight, INIT_STD)

    def set_attn_fn(self, attn_fn: AttnFn | None) -> None:
        """Swap the attention function of every layer (None restores the default SDPA)."""
        for layer in self.layers:
            layer.attention.attn_fn = attn_fn if attn_fn is not None else sdpa_attention

    def forward(self, tokens_BL: Tensor, positions_BL: Tensor | None = None) -> Tensor:
        """Logits B x L x V in the parameters' dtype.

        positions_BL: the absolute position of each token (B x L, or L for all rows). Default
        arange(L). A sequence shard passes its true positions so RoPE matches the full sequence.
        """
        B, L = tokens_BL.shape
        if positions_BL is None:
            if L > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {L} exceeds max_seq_len {self.cfg.max_seq_len}")
            positions_BL = torch.arange(L, device=tokens_BL.device)[None].expand(B, L)
        elif positions_BL.shape[-1] != L or positions_BL.dim() not in (1, 2):
            raise ValueError(
                f"positions_BL must have shape {B} x {L} or {L}, got {tuple(positions_BL.shape)}"
            )
        elif positions_BL.dim() == 1:
            positions_BL = positions_BL[None].expand(B, L)
        cos_B1LD, sin_B1LD = rotary_tables(positions_BL, self.cfg.head_dim, self.cfg.rope_theta)

        h_BLE = self.tok_embeddings(tokens_BL)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h_BLE = checkpoint(layer, h_BLE, cos_B1LD, sin_B1LD, use_reentrant=False)
            else:
                h_BLE = layer(h_BLE, cos_B1LD, sin_B1LD)
        return self.output(self.norm(h_BLE))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KVCache for `forward_cached`, in the parameters' dtype and device."""
        w = self.output.weight
        return KVCache(
            self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
            dtype=w.dtype, device=w.device,
        )  # fmt: skip

    def forward_cached(self, tokens_BL: Tensor, cache: KVCache) -> Tensor:
        """Logits B x L x V of L new tokens that follow the `cache.length` cached ones; appends
        their keys and values to `cache` (generation; the training `forward` is unchanged)."""
        B, L = tokens_BL.shape
        start = cache.length
        positions_BL = torch.arange(start, start + L, device=tokens_BL.device)[None].expand(B, L)
        if cache.pad_B is not None:  # a left-padded row counts from its first token
            positions_BL = (positions_BL - cache.pad_B.to(tokens_BL.device)[:, None]).clamp(min=0)
        cos_B1LD, sin_B1LD = rotary_tables(positions_BL, self.cfg.head_dim, self.cfg.rope_theta)
        h_BLE = self.tok_embeddings(tokens_BL)
        for i, layer in enumerate(self.layers):
            h_BLE = layer.forward_cached(h_BLE, cos_B1LD, sin_B1LD, cache, i)
        cache.length += L
        return self.output(self.norm(h_BLE))

    def loss(
        self, tokens_BL: Tensor, targets_BL: Tensor, positions_BL: Tensor | None = None
    ) -> Tensor:
        """Mean next-token cross entropy over all B x L targets, computed in fp32."""
        logits_BLV = self.forward(tokens_BL, positions_BL)
        return F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(
    preset: str | ModelConfig,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attn_fn: AttnFn | None = None,
) -> Transformer:
    """A Transformer from a preset name ("1m", "10m", "125m", "350m", "1b") or a ModelConfig.

    Initialised on CPU in fp32 from `seed` (bit-identical for the same seed in any process),
    then moved to `device` / `dtype`. `vocab_size` overrides the preset's. device="meta" skips
    allocation and initialisation altogether (for counting parameters of big presets).
    """
    from lowband.models.presets import PRESETS  # presets imports this module

    if isinstance(preset, ModelConfig):
        cfg = preset
    elif isinstance(preset, str):
        key = preset.strip().lower()
        if key not in PRESETS:
            raise ConfigError(
                f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}"
            )
        cfg = PRESETS[key]
    else:
        raise ConfigError(f"model preset must be a name or a ModelConfig, got {preset!r}")
    if vocab_size is not None:
        cfg = replace(cfg, vocab_size=vocab_size)  # re-validated by __post_init__

    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return Transformer(cfg, attn_fn).to(dtype=dtype)
    with torch.device("cpu"):
        model = Transformer(cfg, attn_fn, seed=seed)
    return model.to(device=device, dtype=dtype)
