"""Synchronous data parallel: the baseline every other algorithm is measured against.

1. At construction, make every worker start from rank 0's parameters (an 8-byte digest per
   worker proves they already do; otherwise rank 0 broadcasts them).
2. After every backward, average the gradients across workers: they are flattened into buckets
   of at most `bucket_mb` megabytes, every bucket's all-reduce is issued before any is waited on
   (so the link carries them back to back), then the averages are copied back.
With identical starts and averaged gradients, every worker takes the same optimizer step.

With a `reducer` (--aggregate other than mean, or --attack), step 2 is instead one all-gather of
every worker's whole flat gradient (fp32, or --bits) and a Byzantine-robust rule over the n
gradients (lowband.robust.RobustReducer), identical on every rank. With an `injector`
(--straggler-delay without --stragglers), slow workers sleep before the all-reduce and everybody
waits for them: the baseline gradient coding (lowband.algorithms.coded) is measured against.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start, write_flat
from lowband.coding import StragglerInjector
from lowband.comm import Comm
from lowband.robust import RobustReducer


def _buckets(params: list[nn.Parameter], cap_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive groups of parameters of one dtype and device, each under cap_bytes (or a single tensor)."""
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        if (
            last is None
            or size + nbytes > cap_bytes
            or (last[0].dtype, last[0].device) != (p.dtype, p.device)
        ):
            out.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return out


class DDP(Algorithm):
    """Average gradients across the group every step."""

    name = "ddp"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        comm: Comm,
        *,
        bucket_mb: float = 25.0,
        broadcast_init: bool = True,
        reducer: RobustReducer | None = None,
        injector: StragglerInjector | None = None,
    ) -> None:
        super().__init__(model, optimizer, comm)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = _buckets(self.params, int(bucket_mb * 2**20))
        self.reducer, self.injector = reducer, injector
        if broadcast_init:
            ensure_same_start(comm, [[p.data for p in bucket] for bucket in self.buckets])

    def flat_grads(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every parameter's gradient as one new vector (zeros where there is none)."""
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                for p in self.params
            ]
        )

    def set_grads(self, flat: torch.Tensor) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        write_flat([p.grad for p in self.params], flat)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        if self.comm.size == 1:
            return
        if self.injector is not None:  # an emulated slow worker: everybody waits in the all-reduce
            time.sleep(self.injector.delay(self.local_step, self.comm.rank))
        if self.reducer is not None:
            self.set_grads(self.reducer(self.flat_grads(), round_=self.local_step))
            return
        flats, works = [], []
        for bucket in self.buckets:
            # A parameter without a gradient this step still takes part with zeros, so every
            # worker all-reduces tensors of the same size.
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in bucket
                ]
            )
            flats.append(flat)
            works.append(self.comm.all_reduce(flat, op="avg", async_op=True))
        for bucket, flat, work in zip(self.buckets, flats, works):
            work.wait()
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            write_flat([p.grad for p in bucket], flat)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.reducer is not None:
            state["robust"] = self.reducer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.reducer is not None:
            self.reducer.load_state_dict(state.get("robust", {}))
