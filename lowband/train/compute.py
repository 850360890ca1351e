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


def inner_optimizer(
    model: nn.Module, kind: str, *, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """--inner-optimizer: AdamW (`adamw`), or Muon for the 2-D weights of the blocks and AdamW for
    the rest (`muon`; torch.optim.Muon with its learning rate adjusted to match AdamW's update
    RMS, so the same --lr serves both)."""
    if kind == "adamw":
        return adamw(model, lr=lr, weight_decay=weight_decay, device=device)
    if kind != "muon":
        raise ValueError(f"unknown inner optimizer {kind!r}; choose adamw or muon")
    blocks = getattr(model, "layers", None)
    matrices = {id(p) for p in (blocks.parameters() if blocks is not None else []) if p.dim() == 2}
    if not matrices:
        raise ValueError("muon needs a model whose `layers` hold weight matrices")
    muon = torch.optim.Muon(
        [p for p in model.parameters() if id(p) in matrices],
        lr=lr,
        weight_decay=weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    rest = [p for p in model.parameters() if id(p) not in matrices]
    other = torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    return Composite([muon, other])


class Composite(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters stepped as one: one list of param groups (a
    schedule sets every group's lr), one step (with the step hooks an algorithm installs), one
    state dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for o, saved in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(saved)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


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
