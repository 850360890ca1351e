"""Synchronous data parallel: the baseline every other algorithm is measured against.

1. At construction, make every worker start from rank 0's parameters (an 8-byte digest per
   worker proves they already do; otherwise rank 0 broadcasts them).
2. After every backward, one round of the sync group (lowband.comm.sync): average the
   gradients across workers: they are flattened into buckets
   of at most `bucket_mb` megabytes, every bucket's all-reduce is issued before any is waited on
   (so the link carries them back to back), then the averages are copied back.
   With --bits below 32 the whole gradient goes through one quantized all-reduce instead (every
   rank decodes the same bytes, so the average is still identical everywhere).
3. Commit: apply the average (a static group always does); an elastic round that failed leaves
   no gradient, so the optimizer step changes nothing and no worker applies the round.
With identical starts and averaged gradients, every worker takes the same optimizer step.

With a `reducer` (--aggregate other than mean, or --attack), step 2 is instead one all-gather of
every worker's whole flat gradient (fp32, or --bits) and a Byzantine-robust rule over the n
gradients (lowband.robust.RobustReducer), identical on every rank. With an `injector`
(--straggler-delay without --stragglers), slow workers sleep before the all-reduce and everybody
waits for them: the baseline gradient coding (lowband.algorithms.coded) is measured against.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start, write_flat
from lowband.algorithms.registry import OptionError, check_bits
from lowband.coding import StragglerInjector
from lowband.comm import Comm, get_codec, quantized_all_reduce
from lowband.comm.sync import SyncGroup
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


@dataclasses.dataclass(kw_only=True)
class DDPOptions:
    """Options of --algo ddp."""

    bucket_mb: float = 25.0
    """Gradients are all-reduced in buckets of at most this many megabytes."""
    bits: int = 32
    """Bits per gradient value on the wire: 32 (fp32 all-reduce), 16 (bf16), 8 or 4 (blockwise int, a quantized all-reduce); with a robust --aggregate, the all-gathered gradients' codec."""

    def __post_init__(self) -> None:
        if not self.bucket_mb > 0:
            raise OptionError(f"{{bucket_mb}} must be positive, got {self.bucket_mb}")
        check_bits(self.bits)


class DDP(Algorithm):
    """Average gradients across the group every step."""

    name = "ddp"
    Options = DDPOptions
    supports = frozenset({"robust", "stragglers", "straggler_delay", "seq_parallel"})

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group: Comm | SyncGroup,
        *,
        reducer: RobustReducer | None = None,
        injector: StragglerInjector | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, optimizer, group)
        self.options = opts = DDPOptions(**options)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = _buckets(self.params, int(opts.bucket_mb * 2**20))
        self.codec = get_codec(opts.bits)
        self.reducer, self.injector = reducer, injector
        ensure_same_start(self.comm, [[p.data for p in bucket] for bucket in self.buckets])

    @classmethod
    def from_options(cls, model, optimizer, group, options, setup) -> DDP:
        if setup.code is not None:  # --stragglers: gradient coding
            from lowband.algorithms.coded import CodedDDP

            return CodedDDP(model, optimizer, group, code=setup.code, injector=setup.injector)
        return cls(
            model,
            optimizer,
            group,
            reducer=setup.reducer(get_codec(options.bits)),
            injector=setup.injector,
            **dataclasses.asdict(options),
        )

    def flat_grads(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every parameter's gradient as one new vector (zeros where there is none)."""
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                for p in self.params
            ]
        )

    def set_grads(self, flat: torch.Tensor, params: list[nn.Parameter] | None = None) -> None:
        params = self.params if params is None else params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        write_flat([p.grad for p in params], flat)

    def shared_state(self) -> list[torch.Tensor]:
        """What every replica holds bit-identically (lowband.fault.parity): the parameters."""
        return [p.data for p in self.params]

    @torch.no_grad()
    def sync_gradients(self) -> None:
        if self.joining:
            self.join()
        else:
            self._sync_round("gradients")

    @torch.no_grad()
    def _continue_round(self, round_: Any) -> None:
        comm, scale = self.comm, self.sync.scale
        averaged: list[tuple[list[nn.Parameter], torch.Tensor]] = []
        try:
            if comm.size > 1:
                averaged = self._reduce(comm, scale)
        except Exception as e:  # noqa: BLE001 - a static group re-raises; elastic: round fails
            self.sync.report(e)
        if not self.sync.commit():
            for p in self.params:
                p.grad = None  # the optimizer skips parameters without gradients
            self.sync.discarded("ddp", self.local_step + 1, "not committed")
            return
        for params, flat in averaged:
            self.set_grads(flat, params)
        self.sync.committed(self, self.local_step + 1)

    def _reduce(self, comm: Comm, scale: float) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
        """The averaged gradients, as (parameters, flat average) pairs."""
        if self.injector is not None:  # an emulated slow worker: everybody waits in the reduction
            seat = self.sync.members[comm.rank]
            time.sleep(self.injector.delay(self.local_step, seat % self.injector.n))
        if self.reducer is not None:  # robust rule: rows of non-contributors are left out
            flat = self.reducer(
                self.flat_grads(),
                round_=self.local_step,
                comm=comm,
                members=self.sync.members,
                keep=self.sync.contributing,
            )
            return [(self.params, flat)]
        if self.codec.bits < 32:  # one quantized all-reduce of the whole gradient
            flat = self.flat_grads()
            if scale != 1.0:
                flat.mul_(scale)
            return [(self.params, quantized_all_reduce(comm, flat, self.codec, op="avg"))]
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
            if scale != 1.0:
                flat.mul_(scale)
            flats.append(flat)
            works.append(comm.all_reduce(flat, op="avg", async_op=True))
        for work in works:  # every bucket is issued before any is waited on
            work.wait()
        return list(zip(self.buckets, flats))

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.reducer is not None:
            state["robust"] = self.reducer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.reducer is not None:
            self.reducer.load_state_dict(state.get("robust", {}))
