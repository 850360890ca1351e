"""How a worker's step runs on its device: compiled blocks, fused AdamW, the next batch already on
the device, and no host synchronisation on steps that log nothing (the loop reads the loss only
when it writes it).

Compilation is per transformer block (`nn.Module.compile`, as torchtitan does): the blocks share
one compiled graph, so compile time does not grow with depth, the parameters keep their names
(checkpoints and state dicts are unchanged), and what stays eager (embedding, rotary tables, the
256-wide head and its loss) is a few small kernels. benchmarks/gpu_step.py measures it against a
bare whole-model compile of the same model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def wants_compile(setting: bool | None, device: torch.device, seq_parallel: bool = False) -> bool:
    """--compile / --no-compile, or by default: on for CUDA unless sequence parallelism runs
    collectives inside the blocks; off on CPU (small models there gain less than the compile
    costs)."""
    if setting is not None:
        return setting
    return device.type == "cuda" and not seq_parallel


def prepare_model(model: nn.Module, *, compile: bool, activation_checkpointing: bool) -> None:
    """Compile each block in place and/or turn on activation checkpointing (lowband's models;
    a model without `.layers` is compiled whole)."""
    if activation_checkpointing:
        if not hasattr(model, "checkpoint_activations"):
            raise ValueError(
                f"activation checkpointing needs one of lowband's models, not {type(model).__name__}"
            )
        model.checkpoint_activations = True
    if compile:
        blocks = getattr(model, "layers", None)
        for block in blocks if blocks is not None else [model]:
            block.compile()


def adamw(model: nn.Module, *, lr: float, weight_decay: float, device: torch.device):
    """AdamW with betas (0.9, 0.95): the fused kernel on CUDA, foreach elsewhere. Learning rates
    stay Python floats, so a schedule's step costs no host synchronisation."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=(0.9, 0.95),
        weight_decay=weight_decay,
        **({"fused": True} if cuda else {"foreach": False}),
    )


class DeviceBatches:
    """The sampler's batch of a step, on the device, with the next step's copy already issued.

    `batch(step)` is a pure function of the step (lowband.data), so the batch of step + 1 is
    fetched into pinned memory and copied asynchronously while step runs; a step that jumps (a
    heal, a resume) simply misses and fetches its own. On CPU it is the sampler itself."""

    def __init__(self, sampler: Any, device: torch.device) -> None:
        self.sampler, self.device = sampler, device
        self._ahead: tuple[int, tuple[torch.Tensor, ...]] | None = None

        self._ahead_enabled = device.type != "cpu"

    def _fetch(self, step: int) -> tuple[torch.Tensor, ...]:
        host = tuple(self.sampler.batch(step))
        if not self._ahead_enabled:
            return host
        if self.device.type == "cuda":
            host = tuple(t.pin_memory() for t in host)
        return tuple(t.to(self.device, non_blocking=True) for t in host)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        if self._ahead is not None and self._ahead[0] == step:
            out = self._ahead[1]
        else:
            out = self._fetch(step)
        self._ahead = (step + 1, self._fetch(step + 1)) if self._ahead_enabled else None
        return out
