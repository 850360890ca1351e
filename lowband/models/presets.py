"""Named model sizes, from a CPU-friendly 1M to a 1B that needs a GPU.

Counts are at vocab_size=256 (byte-level tokens), where the untied embedding and head are tiny
(2 * 256 * dim), so nearly all parameters sit in the blocks; each preset's body is sized to hit
its nominal count on its own. Head dims are 64 (32 for "1m", whose dim is only 128), and every
preset uses grouped-query attention with kv heads dividing heads.

    name   params (vocab 256)   dim  layers  heads/kv  ffn
    1m            853,120        128     4      4/2     384
    10m         9,638,784        384     6      6/2    1024
    125m      125,455,104        768    12     12/4    3840
    350m      346,604,544       1024    24     16/4    3840
    1b        974,194,688       2048    16      32/8    8192   (Llama 3.2 1B's blocks)

tests/test_models.py checks these numbers against count_params().
"""

from __future__ import annotations

from lowband.models.llama import ModelConfig, count_params

PRESETS: dict[str, ModelConfig] = {
    # The CPU default: one training step at batch 8 x seq 128 takes well under 0.2 s on one thread.
    "1m": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "10m": ModelConfig(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024),
    # GPT-2 small's width and depth; the wide ffn makes up for the byte vocabulary's tiny embedding.
    "125m": ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=3840),
    "350m": ModelConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=4, ffn_dim=3840),
    "1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192),
}


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 5e8 else f"{n / 1e6:.2f}M"


def describe_presets() -> str:
    """A small text table of the presets: name, parameters at vocab 256, dim, layers, heads/kv."""
    header = f"{'name':<6} {'params (vocab 256)':>21} {'dim':>5} {'layers':>6} {'heads/kv':>8} {'ffn':>5}"
    rows = [header]
    for name, cfg in PRESETS.items():
        n = count_params(cfg)  # presets keep the default vocab_size=256
        rows.append(
            f"{name:<6} {n:>12,} {_human(n):>8} {cfg.dim:>5} {cfg.n_layers:>6} "
            f"{f'{cfg.n_heads}/{cfg.n_kv_heads}':>8} {cfg.ffn_dim:>5}"
        )
    return "\n".join(rows)
