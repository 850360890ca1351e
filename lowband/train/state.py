"""One worker's training state, and the step function `lowband train` plugs into the loop.

`TrainState` holds everything that decides what a worker computes next: model, optimizer, learning
rate schedule, algorithm and step (the data position is a pure function of the step, so it needs
no state of its own). Its one `state_dict()` serves both a checkpoint and a live recovery (a
newcomer downloads it from a peer); `load_state_dict` is the only way the step ever jumps.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from lowband.algorithms import Algorithm
from lowband.fault.parity import state_digest
from lowband.train.compute import DeviceBatches


class TrainState:
    """model + optimizer + schedule + algorithm + step (module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        algo: Algorithm,
        step: int = 0,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.algo = model, optimizer, scheduler, algo
        self.step = step
        self.start_step = step
        """Where this worker's own progress counts from (tokens/s): its start, resume or heal."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "algo": self.algo.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.algo.load_state_dict(state["algo"])
        self.step = self.start_step = int(state["step"])

    def digest(self) -> str:
        """A digest of the exact parameter bytes: equal only for bit-identical models."""
        return f"{state_digest(list(self.model.state_dict().values())):016x}"


class TrainStep:
    """`lowband train`'s step: forward and backward, then the algorithm's hooks around the
    optimizer step. A newcomer's first step has nothing to compute: it heals inside the hooks."""

    def __init__(
        self,
        state: TrainState,
        sampler: Any,
        loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
        autocast: Callable[[], AbstractContextManager],
        grad_clip: float,
    ) -> None:
        self.state, self.batches, self.loss_fn = state, DeviceBatches(sampler, device), loss_fn
        self.device, self.autocast, self.grad_clip = device, autocast, grad_clip

    def __call__(self) -> torch.Tensor:
        """Take the next step; returns its training loss as a tensor on the device (nan for a
        newcomer's first): reading it waits for the device, so the loop does so only when it
        writes it."""
        s = self.state
        s.step += 1
        loss = torch.tensor(float("nan"))
        if not s.algo.joining:
            x, y = self.batches.batch(s.step)
            with self.autocast():
                loss = self.loss_fn(s.model, x, y)
            loss.backward()
        s.algo.sync_gradients()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), self.grad_clip)
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.algo.step()  # may heal this worker: s.step is then its source's
        return loss.detach()
