"""Tests for lowband.models: sizes, seeding, causality, GQA against a repeated-kv reference, RoPE.

Shape suffixes as in lowband/models/llama.py: B batch, L length, H query heads, K kv heads,
D head dim, E model dim, V vocab.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import lowband
from lowband.errors import ConfigError
from lowband.models import PRESETS, ModelConfig, Transformer, build_model, describe_presets
from lowband.models.llama import apply_rotary, count_params, rotary_tables

NOMINAL = {"1m": 1e6, "10m": 10e6, "125m": 125e6, "350m": 350e6, "1b": 1e9}

# Small enough that every forward/backward below takes milliseconds.
TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)


def _tokens(B: int, L: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- sizes


def test_presets_are_the_documented_set():
    assert list(PRESETS) == list(NOMINAL)
    table = describe_presets()
    for name, cfg in PRESETS.items():
        assert f"{count_params(cfg):,}" in table
        assert name in table


@pytest.mark.parametrize("name", list(NOMINAL))
def test_preset_param_count_near_nominal(name):
    cfg = PRESETS[name]
    assert cfg.vocab_size == 256
    n = count_params(cfg)
    assert abs(n - NOMINAL[name]) / NOMINAL[name] < 0.25, f"{name}: {n:,}"
    # head_dim 64 or 128 except for the tiny 1m (dim 128), kv heads dividing heads.
    assert cfg.head_dim in (64, 128) or name == "1m"
    # The analytic count matches the real module tree (meta device: nothing is allocated).
    assert build_model(name, device="meta").num_params() == n


@pytest.mark.parametrize("name", ["1m", "10m"])
def test_count_params_matches_materialised_model(name):
    model = build_model(name)
    assert model.num_params() == count_params(PRESETS[name])
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_vocab_override_and_module_layout():
    model = build_model("1m", vocab_size=1000, device="meta")
    assert model.cfg.vocab_size == 1000
    assert model.tok_embeddings.weight.shape == (1000, 128)
    assert model.output.weight.shape == (1000, 128)
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 4
    assert model.norm.weight.shape == (128,)
    assert all(b.bias is None for b in model.modules() if isinstance(b, torch.nn.Linear))
    assert PRESETS["1m"].vocab_size == 256  # the preset itself is untouched


# ---------------------------------------------------------------------------- seeding


def test_same_seed_bit_identical_despite_global_rng():
    torch.manual_seed(123)
    a = build_model(TINY, seed=7)
    torch.rand(1000)  # move the global RNG between the two builds
    torch.manual_seed(999)
    b = build_model(TINY, seed=7)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    c = build_model(TINY, seed=8)
    assert not torch.equal(a.output.weight, c.output.weight)
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)


def test_build_does_not_consume_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    build_model(TINY, seed=3)
    assert torch.equal(torch.rand(4), expected)


def test_same_seed_bit_identical_in_another_process():
    code = (
        "import hashlib, torch\n"
        "from lowband.models import build_model\n"
        "torch.manual_seed(42)\n"
        "m = build_model('1m', seed=5)\n"
        "h = hashlib.sha256()\n"
        "for n, p in m.named_parameters():\n"
        "    h.update(n.encode()); h.update(p.detach().contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    root = str(Path(lowband.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _param_digest(build_model("1m", seed=5))


def test_init_statistics():
    model = build_model("10m", seed=0)
    std = model.layers[0].attention.wq.weight.std().item()
    out_std = model.layers[0].feed_forward.w2.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert out_std == pytest.approx(0.02 / math.sqrt(2 * 6), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(384))


# ---------------------------------------------------------------------------- forward


def test_forward_shape_and_initial_loss():
    model = build_model("1m", seed=0)
    tokens = _tokens(2, 32, 256)
    logits = model(tokens)
    assert logits.shape == (2, 32, 256) and logits.dtype == torch.float32
    loss = model.loss(tokens, _tokens(2, 32, 256, seed=1))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(math.log(256), abs=0.1)


def test_bfloat16_logits_and_fp32_loss():
    model = build_model(TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tokens = _tokens(2, 8, 64)
    assert model(tokens).dtype == torch.bfloat16
    assert model.loss(tokens, tokens).dtype == torch.float32


def test_causality():
    model = build_model(TINY, seed=1)
    tokens = _tokens(2, 16, 64)
    t = 9
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_max_seq_len_enforced_for_implicit_positions():
    model = build_model(replace(TINY, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(1, 9, 64))


# ---------------------------------------------------------------------------- GQA


def _reference_attention(q_BHLD, k_BKLD, v_BKLD, *, causal):
    """Textbook attention after repeating each kv head for its group of query heads."""
    group = q_BHLD.shape[1] // k_BKLD.shape[1]
    k_BHLD = k_BKLD.repeat_interleave(group, dim=1)
    v_BHLD = v_BKLD.repeat_interleave(group, dim=1)
    scores_BHLL = q_BHLD @ k_BHLD.transpose(-1, -2) / math.sqrt(q_BHLD.shape[-1])
    if causal:
        L = q_BHLD.shape[2]
        future = torch.ones(L, L, dtype=torch.bool).triu(1)
        scores_BHLL = scores_BHLL.masked_fill(future, float("-inf"))
    return scores_BHLL.softmax(-1) @ v_BHLD


def _loss_and_embedding_grad(model, tokens, targets):
    model.zero_grad()
    loss = model.loss(tokens, targets)
    loss.backward()
    return loss.detach(), model.tok_embeddings.weight.grad.clone()


def test_gqa_matches_repeated_kv_reference():
    tokens, targets = _tokens(2, 12, 64), _tokens(2, 12, 64, seed=1)
    fused = build_model(TINY, seed=2)
    reference = build_model(TINY, seed=2, attn_fn=_reference_attention)
    # An MHA model whose kv projections are the GQA ones repeated per query head: this checks
    # the head layout of wk/wv as well as the attention function.
    mha = build_model(replace(TINY, n_kv_heads=TINY.n_heads), seed=0)
    group, D = TINY.n_heads // TINY.n_kv_heads, TINY.head_dim
    with torch.no_grad():
        for name, p in mha.named_parameters():
            src = fused.get_parameter(name)
            if name.endswith(("attention.wk.weight", "attention.wv.weight")):
                src = src.view(TINY.n_kv_heads, D, -1).repeat_interleave(group, dim=0)
            p.copy_(src.reshape(p.shape))

    with torch.no_grad():
        out = fused(tokens)
        torch.testing.assert_close(out, reference(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, mha(tokens), atol=1e-5, rtol=1e-5)
    loss, grad = _loss_and_embedding_grad(fused, tokens, targets)
    for other in (reference, mha):
        other_loss, other_grad = _loss_and_embedding_grad(other, tokens, targets)
        torch.testing.assert_close(loss, other_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, other_grad, atol=1e-6, rtol=1e-4)
    assert grad.abs().sum() > 0


def test_set_attn_fn_swaps_every_layer():
    calls = []

    def counting(q_BHLD, k_BKLD, v_BKLD, *, causal):
        calls.append((q_BHLD.shape, k_BKLD.shape, causal))
        return _reference_attention(q_BHLD, k_BKLD, v_BKLD, causal=causal)

    model = build_model(TINY)
    model.set_attn_fn(counting)
    model(_tokens(3, 5, 64))
    assert calls == [((3, 4, 5, 8), (3, 2, 5, 8), True)] * TINY.n_layers


# ---------------------------------------------------------------------------- RoPE / positions


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q_BHLD, k_BHLD = torch.randn(2, 3, 10, 16, generator=g), torch.randn(2, 3, 10, 16, generator=g)
    pos_BL = torch.arange(10).expand(2, 10)

    def scores(positions_BL):
        cos, sin = rotary_tables(positions_BL, 16, 10000.0)
        return apply_rotary(q_BHLD, cos, sin) @ apply_rotary(k_BHLD, cos, sin).transpose(-1, -2)

    base = scores(pos_BL)
    for offset in (1, 37, 500):
        torch.testing.assert_close(scores(pos_BL + offset), base, atol=1e-4, rtol=1e-4)
    # Not vacuous: the rotation changes the scores, and it preserves norms.
    assert not torch.allclose(base, q_BHLD @ k_BHLD.transpose(-1, -2), atol=1e-2)
    cos, sin = rotary_tables(pos_BL + 3, 16, 10000.0)
    torch.testing.assert_close(apply_rotary(q_BHLD, cos, sin).norm(dim=-1), q_BHLD.norm(dim=-1))


def test_positions_default_and_broadcast():
    model = build_model(TINY)
    tokens = _tokens(2, 8, 64)
    with torch.no_grad():
        default = model(tokens)
        torch.testing.assert_close(model(tokens, torch.arange(8).expand(2, 8)), default)
        torch.testing.assert_close(model(tokens, torch.arange(8)), default)
        # A uniform shift changes nothing (RoPE is relative); spreading the positions does.
        torch.testing.assert_close(model(tokens, torch.arange(8) + 5), default)
        assert not torch.allclose(model(tokens, torch.arange(8) * 3), default)
    with pytest.raises(ValueError, match="positions_BL"):
        model(tokens, torch.arange(7))


def test_sequence_shard_with_true_positions_sees_the_same_q_and_k():
    """Layer 0's rotated q/k of the second half, run alone at its true positions, equal the
    second half of the full sequence's: what a sequence-parallel attn_fn will be given."""
    seen = []

    def recording(q_BHLD, k_BKLD, v_BKLD, *, causal):
        seen.append((q_BHLD, k_BKLD))
        return _reference_attention(q_BHLD, k_BKLD, v_BKLD, causal=causal)

    model = build_model(TINY, attn_fn=recording)
    tokens = _tokens(2, 16, 64)
    with torch.no_grad():
        model(tokens)
        q_full, k_full = seen[0]
        seen.clear()
        model(tokens[:, 8:], positions_BL=torch.arange(8, 16).expand(2, 8))
    q_shard, k_shard = seen[0]
    torch.testing.assert_close(q_shard, q_full[:, :, 8:])
    torch.testing.assert_close(k_shard, k_full[:, :, 8:])


# ---------------------------------------------------------------------------- errors


def test_unknown_preset_raises_config_error_listing_names():
    with pytest.raises(ConfigError) as info:
        build_model("foo")
    message = str(info.value)
    assert "'foo'" in message and "\n" not in message
    assert "1m, 10m, 125m, 350m, 1b" in message
    with pytest.raises(ConfigError):
        build_model(123)  # type: ignore[arg-type]


def test_preset_names_are_case_insensitive():
    assert build_model("1M", device="meta").cfg == PRESETS["1m"]


@pytest.mark.parametrize(
    "change",
    [
        {"n_kv_heads": 3},  # 4 heads not divisible by 3 kv heads
        {"dim": 30},  # 30 not divisible by 4 heads
        {"dim": 12, "n_heads": 4},  # odd head_dim 3: RoPE needs pairs
        {"n_layers": 0},
        {"ffn_dim": -1},
        {"vocab_size": 0},
        {"rope_theta": 0.0},
        {"norm_eps": -1e-5},
        {"dim": 32.0},
        {"n_layers": True},
    ],
)
def test_bad_configs_raise_config_error(change):
    with pytest.raises(ConfigError):
        replace(TINY, **change)


def test_bad_vocab_override_raises_config_error():
    with pytest.raises(ConfigError):
        build_model("1m", vocab_size=0)


def test_transformer_direct_construction_matches_build_model():
    torch.manual_seed(5)
    direct = Transformer(TINY, seed=4)
    assert _param_digest(direct) == _param_digest(build_model(TINY, seed=4))
    with torch.device("meta"):
        meta = Transformer(PRESETS["1b"])
    assert meta.output.weight.is_meta and meta.num_params() == count_params(PRESETS["1b"])
