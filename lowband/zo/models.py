"""What `lowband finetune` trains: a preset or an offline Hugging Face causal LM, fresh or from --init.

--init accepts a lowband run folder (its latest complete checkpoint), one checkpoint folder
(RUN/ckpt/step_N) or a checkpoint file (RUN/ckpt/step_N/rank0.pt). The weights are rank 0's
`model` state (identical on every rank for DDP and ZO runs; DiLoCo-style runs hold per-rank
local parameters, of which rank 0's are taken). The model preset comes from the run's config.json.

Hugging Face models (`hf:NAME`) are built from a `transformers` config with small sizes, no
download, and wrapped so they expose the same `loss(tokens, targets)` as lowband's own models.
transformers stays optional (the `hf` extra).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowband.errors import ConfigError
from lowband.models import PRESETS, build_model
from lowband.train.rundir import RunDir

HF_PRESETS: dict[str, dict[str, int]] = {
    # LlamaConfig sizes; vocab_size comes from the corpus.
    "llama-tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # The width and depth of lowband's 1m preset.
    "llama-1m": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


_GLOBAL_RNG = threading.Lock()


class HFCausalLM(nn.Module):
    """A transformers causal LM with lowband's `loss(tokens, targets)` (mean cross entropy, fp32)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def loss(self, tokens_BL: Tensor, targets_BL: Tensor) -> Tensor:
        logits_BLV = self.hf(input_ids=tokens_BL, use_cache=False).logits
        return F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_model_name(name: str) -> None:
    """Raise ConfigError unless `name` is a preset or an hf: model that can be built here."""
    if name.startswith("hf:"):
        if name[3:] not in HF_PRESETS:
            raise ConfigError(
                f"unknown Hugging Face model {name!r}; choose one of: "
                + ", ".join(f"hf:{k}" for k in HF_PRESETS)
            )
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--model {name} needs transformers (pip install 'lowband[hf]')"
            ) from None
    elif name not in PRESETS:
        raise ConfigError(
            f"unknown model {name!r}; choose a preset ({', '.join(PRESETS)}) or "
            + ", ".join(f"hf:{k}" for k in HF_PRESETS)
        )


def build(name: str, vocab_size: int, seed: int, device: torch.device | str) -> nn.Module:
    """A fresh model: lowband preset or hf:NAME, initialised from `seed`, on `device`."""
    check_model_name(name)
    if not name.startswith("hf:"):
        return build_model(name, vocab_size=vocab_size, seed=seed, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **HF_PRESETS[name[3:]])
    # transformers initialises from torch's global generator: seed it, and hold a lock so ranks
    # running as threads of one process (tests) do not interleave their draws.
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HFCausalLM(LlamaForCausalLM(config))
    return model.to(device)


@dataclass(frozen=True)
class Init:
    """A resolved --init: where its weights are and which model they belong to."""

    path: Path
    """The checkpoint file (rank0.pt)."""
    model: str | None
    """The model name from the run's config.json (None when the file is not in a run folder)."""
    step: int | None


def resolve_init(spec: str) -> Init:
    """Find the checkpoint file behind --init; ConfigError (one line) if there is none."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"--init {spec}: no such run folder or checkpoint")
    if path.is_dir() and (path / "config.json").exists():
        ckpts = RunDir(path).checkpoints()
        if not ckpts:
            raise ConfigError(f"--init {spec}: the run has no complete checkpoint")
        ckpt_dir, run_dir = ckpts[-1].path, path
    elif path.is_dir() and (path / "rank0.pt").exists():
        ckpt_dir, run_dir = path, path.parent.parent
    elif path.is_file():
        ckpt_dir, run_dir = path.parent, path.parent.parent
    else:
        raise ConfigError(f"--init {spec}: not a lowband run folder or checkpoint")
    file = path if path.is_file() else ckpt_dir / "rank0.pt"
    model = None
    if (run_dir / "config.json").exists():
        try:
            model = json.loads((run_dir / "config.json").read_text()).get("model")
        except json.JSONDecodeError:
            raise ConfigError(f"--init {spec}: {run_dir / 'config.json'} is unreadable") from None
    step = int(ckpt_dir.name[5:]) if ckpt_dir.name.startswith("step_") else None
    return Init(file, model, step)


def load_init_state(init: Init) -> dict[str, Tensor]:
    try:
        state: Any = torch.load(init.path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ConfigError(f"--init {init.path}: cannot read it ({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"--init {init.path}: not a lowband checkpoint (no model state)")
    return state["model"]


def check_fits(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """ConfigError naming the first parameter whose name or shape does not match."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    for k in sorted(mine.keys() | theirs.keys()):
        if mine.get(k) != theirs.get(k):
            raise ConfigError(
                f"--init {what} does not match the model: {k} is {theirs.get(k)} in the "
                f"checkpoint, {mine.get(k)} in the model"
            )


def build_for_finetune(
    name: str, vocab_size: int, seed: int, device: torch.device | str, init: str | None
) -> nn.Module:
    """The starting model of a fine-tuning run: fresh from `seed`, or `init`'s weights."""
    model = build(name, vocab_size, seed, device)
    if init is not None:
        found = resolve_init(init)
        state = load_init_state(found)
        check_fits(model, state, init)
        model.load_state_dict(state)
    return model
