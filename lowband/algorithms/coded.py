"""Gradient-coded DDP (--stragglers s): every step finishes on the first n - s workers.

Gradient coding (Tandon et al., ICML 2017) with the codes of lowband.coding:
  1. A step's data is cut into n parts; part j is exactly what rank j draws in plain DDP
     (ShardSampler(rank=j).batch(step)), so part j's batch at step t is a pure function of
     (seed, j, t) and the decoded gradient is plain DDP's average.
  2. Rank i computes the gradients of the s + 1 parts code.parts(i): the loop's backward gives its
     own part i, sync_gradients runs the other s forward/backward passes itself. That is s + 1
     times DDP's compute: the price of not waiting for anybody.
  3. `coded_round`: every rank sends f_i = sum_j B[i, j] g_j to rank 0, which decodes sum_j g_j
     from the first n - s arrivals and sends it back point to point; sum / n becomes the gradient.
  4. Stragglers are emulated by a seeded StragglerInjector (--slow-workers, --straggler-delay): a
     slow rank is late by the delay, or until rank 0's result arrives if that is sooner (a
     straggler's work is abandoned once the step is decoded without it).
Rank 0's receives from a step's stragglers stay in flight; they are waited for after the next
step's round (the late ranks sent long before) and at close(). Bytes go through Comm: a worker
sends and receives one gradient per step, rank 0 (n - 1) of each.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lowband.algorithms.ddp import DDP
from lowband.coding import GradientCode, StragglerInjector, coded_round
from lowband.comm import Comm
from lowband.comm.sync import SyncGroup
from lowband.errors import ConfigError


class _StepTap:
    """The loop's sampler, noting which step's batch was last drawn (the step being computed)."""

    def __init__(self, sampler: Any, algo: CodedDDP) -> None:
        self.sampler, self.algo = sampler, algo

    def batch(self, step: int):
        self.algo.data_step = step
        return self.sampler.batch(step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


class CodedDDP(DDP):
    """DDP whose gradient average is decoded from the first n - s workers (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        comm: Comm | SyncGroup,
        *,
        code: GradientCode,
        injector: StragglerInjector | None = None,
    ) -> None:
        super().__init__(model, optimizer, comm)
        if code.n != self.comm.size:
            raise ConfigError(
                f"a gradient code for {code.n} workers needs {code.n}, got {self.comm.size}"
            )
        self.code, self.straggler_injector = code, injector
        self.data_step: int | None = None
        self.last_survivors: list[int] = []
        """The ranks rank 0 decoded the last step from, in arrival order (rank 0 only)."""
        self._samplers: dict[int, Any] | None = None
        self._late: list = []

    def wrap_sampler(self, sampler: Any) -> Any:
        from lowband.data import ShardSampler

        sampler = super().wrap_sampler(sampler)
        rank = self.comm.rank
        if (sampler.rank, sampler.world_size) != (rank, self.code.n):
            raise ConfigError(
                f"gradient coding needs rank {rank}'s sampler of {self.code.n} shards, got "
                f"rank {sampler.rank} of {sampler.world_size}"
            )
        self._samplers = {
            j: ShardSampler(
                sampler.tokens,
                rank=j,
                world_size=sampler.world_size,
                batch_size=sampler.batch_size,
                seq_len=sampler.seq_len,
                seed=sampler.seed,
            )
            for j in self.code.parts(rank)
            if j != rank
        }
        return _StepTap(sampler, self)

    def part_gradients(self) -> dict[int, torch.Tensor]:
        """{part: flat gradient} of this rank's s + 1 parts; the loop's backward gave its own."""
        if self._samplers is None or self.data_step is None:
            raise RuntimeError("CodedDDP draws its batches through wrap_sampler(sampler) first")
        dtype = self.params[0].dtype
        parts = {self.comm.rank: self.flat_grads(dtype)}
        device = self.params[0].device
        autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if device.type == "cuda"
            else nullcontext
        )
        for j, sampler in self._samplers.items():
            for p in self.params:
                p.grad = None
            x, y = (t.to(device) for t in sampler.batch(self.data_step))
            with autocast():
                loss = self.model.loss(x, y)
            loss.backward()
            parts[j] = self.flat_grads(dtype)
        return parts

    def sync_gradients(self) -> None:
        if self.comm.size == 1:
            return
        parts = self.part_gradients()
        rank, step = self.comm.rank, self.local_step
        delay = self.straggler_injector.delay(step, rank) if self.straggler_injector else 0.0
        with torch.no_grad():
            res = coded_round(self.comm, self.code, parts, round_=step, delay_s=delay, abandon=True)
            self.set_grads(res.gradient / self.code.n)
        for w in self._late:  # the previous step's stragglers have long arrived
            w.wait()
        self._late = res.pending
        self.last_survivors = res.survivors

    def close(self) -> None:
        for w in self._late:
            w.wait()
        self._late = []
        super().close()
