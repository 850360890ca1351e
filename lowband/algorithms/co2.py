"""CO2: local updating whose parameter averaging runs entirely behind the next round's compute.

CO2 (Sun et al., ICLR 2024, arXiv 2401.16265). Every worker keeps theta_old (outer weights,
identical on every worker) and an outer momentum m. Rounds are H = sync_every inner steps; round r
starts at theta_old and ends at the worker's local theta_i,r. At the end of round r:
  1. Start averaging round r: Delta_r = mean_i(theta_old - theta_i,r) by quantized_all_reduce in a
     background thread (Comm.background()), so theta_bar_r = theta_old - Delta_r.
  2. Outer step with the average that is ready: with delay 1 that is round r-1's, which has been
     on the wire during all H inner steps of round r (the "full overlap"); with delay 0 it is
     round r's own, waited for at once (the synchronous form, DiLoCo-like):
         m <- beta * m + (theta_old - theta_bar) / lambda
         m <- clamp(m, -c, c)                   (outer momentum clipping; really applied)
         theta_old <- theta_old - eta * m ;   theta_i <- theta_old
  At round 1 with delay 1 nothing has landed yet: theta_bar := theta_old (all workers start
  there), a zero update, and workers restart round 2 from theta_old; round 1's work is not lost,
  it arrives with round 1's average at the end of round 2.

`co2_outer_step` is this rule verbatim on flat tensors (the test reference). Defaults are the
reference code's (github.com/weigao266/fairscale-CO2, gossip/co2.py): outer_frequency 48, outer
momentum 0.5, outer lr 1.0, gap penalty 1.0, clip threshold 1.0. Two differences from that code:
  * its `_co2_clip` calls torch.clamp without keeping the result, so its clipping does nothing;
    here clamp_ is in place and tested both ways;
  * it all-reduces the live parameters in place while training continues on them; here the
    background thread reduces a snapshot of Delta_r and nothing touches the live weights until
    the outer step.

Staleness. With delay 1 the averaged weights come from round r-1, which started at the previous
theta_old, not the current one, so
    theta_old - theta_bar_{r-1} = s + g,   s = theta_old - theta_old_prev = -eta * m (the last
                                                outer step, the staleness gap),
                                            g = Delta_{r-1}  (the stale pseudo-gradient).
lambda is a constant (`lam`, the reference's co2_gap_penalty) by default. With
`gap_penalty=True` it is, per parameter tensor k,
    lambda_k = lam * (1 + ||s_k|| / ||g_k||)
so that, by the triangle inequality, ||(s_k + g_k) / lambda_k|| <= ||g_k|| / lam: the staleness
gap can never make an update larger than the pseudo-gradient it carries, and with no gap (delay 0,
round 1) lambda = lam. The paper's own formula could not be read from here (only its abstract
and reviews were reachable, and the public code uses a constant): docs/noloco_co2.md says why
this form was chosen. It is unverified against the paper.

Ordering argument (deadlock-freedom): all of CO2's collectives run on one background thread, one
quantized_all_reduce per round, submitted at the end of every round in the same order on every
rank; the main thread issues none after construction. A new round's reduction is submitted before
the previous one is waited for, but a single-thread executor runs them one after the other in
submission order, so every rank issues the same collectives in the same order on the one process
group. `state_dict()` and `close()` wait for the in-flight reduction, so a checkpoint or the end
of training never issues a collective while one is running. With delay 1 at most one reduction
is in flight between rounds. A dead peer makes the background reduction raise the process
group's timeout; the error surfaces from the next outer step (or close), it does not hang.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start, flat_params, write_flat
from lowband.algorithms.overlap import BackgroundReducer
from lowband.algorithms.registry import OptionError, check_bits
from lowband.comm import Comm, get_codec, quantized_all_reduce
from lowband.comm.quantized import quantized_all_reduce_bytes
from lowband.comm.sync import SyncGroup

__all__ = ["CO2", "co2_outer_step", "staleness_penalty"]


@torch.no_grad()
def co2_outer_step(
    theta_old: torch.Tensor,
    momentum: torch.Tensor,
    theta_bar: torch.Tensor,
    *,
    beta: float,
    lr: float,
    lam: float | torch.Tensor,
    clip: float | None,
) -> None:
    """The CO2 outer update, in place on flat tensors (clip None or 0: no clipping)."""
    momentum.mul_(beta).add_((theta_old - theta_bar) / lam)
    if clip:
        momentum.clamp_(-clip, clip)
    theta_old.sub_(lr * momentum)


def staleness_penalty(
    gap: torch.Tensor, pseudo_grad: torch.Tensor, sizes: list[int], lam: float
) -> torch.Tensor:
    """Per-element lambda: lam * (1 + ||gap_k|| / ||pseudo_grad_k||) over each tensor k of `sizes`."""
    gap_norms = torch.stack([x.norm() for x in gap.split(sizes)])
    grad_norms = torch.stack([x.norm() for x in pseudo_grad.split(sizes)])
    ratio = torch.where(
        gap_norms > 0, gap_norms / grad_norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0
    )
    lam_k = lam * (1.0 + ratio)
    return lam_k.repeat_interleave(torch.tensor(sizes, device=lam_k.device))


@dataclasses.dataclass(kw_only=True)
class CO2Options:
    """Options of --algo co2."""

    sync_every: int = 60
    """Inner steps per round (H)."""
    outer_lr: float = 1.0
    """eta: the outer learning rate."""
    outer_momentum: float = 0.5
    """beta: the outer momentum, in [0, 1)."""
    bits: int = 32
    """Bits per pseudo-gradient value on the wire: 32, 16 (bf16), 8 or 4 (blockwise int)."""
    co2_delay: int = 1
    """1 applies the previous round's average while this round's is reduced in the background (full overlap); 0 waits for this round's."""
    co2_lambda: float = 1.0
    """The outer momentum update is divided by this lambda."""
    co2_clip: float = 1.0
    """Clamp the outer momentum to [-c, c] every outer step; 0 (or None) turns clipping off."""
    co2_gap_penalty: int = 0
    """1 scales lambda per tensor by 1 + ||staleness gap|| / ||pseudo-gradient|| (our reconstruction, docs/noloco_co2.md)."""

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise OptionError(f"{{sync_every}} must be at least 1, got {self.sync_every}")
        if self.co2_delay not in (0, 1):
            raise OptionError(f"{{co2_delay}} must be 0 or 1, got {self.co2_delay}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise OptionError(
                f"CO2 beta ({{outer_momentum}}) must be in [0, 1), got {self.outer_momentum}"
            )
        if not self.outer_lr > 0:
            raise OptionError(f"CO2 outer lr ({{outer_lr}}) must be positive, got {self.outer_lr}")
        if not self.co2_lambda > 0:
            raise OptionError(f"{{co2_lambda}} must be positive, got {self.co2_lambda}")
        if self.co2_clip is not None and self.co2_clip < 0:
            raise OptionError(f"{{co2_clip}} must be 0 (off) or positive, got {self.co2_clip}")
        if self.co2_gap_penalty not in (0, 1):
            raise OptionError(f"{{co2_gap_penalty}} must be 0 or 1, got {self.co2_gap_penalty}")
        check_bits(self.bits)


class CO2(Algorithm):
    """CO2 with one-round-delayed (delay=1) or synchronous (delay=0) averaging. See the module docstring."""

    name = "co2"
    Options = CO2Options

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group: Comm | SyncGroup,
        *,
        block_size: int = 64,
        **options: Any,
    ) -> None:
        super().__init__(model, optimizer, group)
        self.options = opts = CO2Options(**options)
        self.H, self.beta, self.lr = opts.sync_every, opts.outer_momentum, opts.outer_lr
        self.lam, self.clip = opts.co2_lambda, opts.co2_clip
        self.delay, self.gap_penalty = opts.co2_delay, bool(opts.co2_gap_penalty)
        self.codec = get_codec(opts.bits, block_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._sizes = [p.numel() for p in self.params]
        ensure_same_start(self.comm, [[p.data for p in self.params]])
        self.theta_old = flat_params(self.params)  # identical on every worker
        self.momentum = torch.zeros_like(self.theta_old)
        self.outer_steps = 0
        self.peak_sync_bytes = 0
        self.applied: list[tuple[int, int | None]] = []  # (local step, round whose average applied)
        self._reducer = BackgroundReducer(self.comm, self.codec)
        self._pending: tuple[int, Any] | None = None  # (round, future or averaged Delta)
        self._counter = torch.zeros(1, dtype=torch.int64)  # outer_steps, for the parity check

    def shared_state(self) -> list[torch.Tensor]:
        """What every worker holds bit-identically (lowband.fault.parity)."""
        self._counter.fill_(self.outer_steps)
        return [self.theta_old, self.momentum, self._counter]

    # -- the hook after every inner step --------------------------------------------------------
    def step(self) -> None:
        if self.joining:  # a newcomer: heal at its peers' round boundary, then take part
            self.join()
            return
        super().step()
        if self.local_step % self.H == 0:
            if self.delay == 1:
                self._land_previous()
            self._sync_round(self.local_step // self.H)

    @torch.no_grad()
    def _land_previous(self) -> None:
        """Wait for round r-1's background average and commit it (before round r opens, so
        rounds and commits alternate as torchft expects). A failed one applies nothing this
        round, as CO2's first round does."""
        if self._pending is None:
            return
        round_, work = self._pending
        result: torch.Tensor | None = None
        try:
            result = self._reducer.result(work)
        except Exception as e:  # noqa: BLE001 - a static group re-raises; elastic: round fails
            self.sync.report(e)
        if not self.sync.commit() or result is None:
            self.sync.discarded("co2", self.local_step, "round average not committed")
            result = None
        self._pending = None if result is None else (round_, result)

    @torch.no_grad()
    def _continue_round(self, round_: int) -> None:
        round_ = self.local_step // self.H  # a heal moves this worker to its source's round
        comm, scale = self.comm, self.sync.scale
        delta = self.theta_old - flat_params(self.params)  # this worker's Delta for round_
        if scale != 1.0:
            delta.mul_(scale)  # a worker that has just healed sends zeros
        sent = quantized_all_reduce_bytes(delta.numel(), comm.size, self.codec)
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        gap = None
        if self.delay == 0:
            g: torch.Tensor | None = None
            try:
                g = quantized_all_reduce(comm, delta, self.codec, "avg")
            except Exception as e:  # noqa: BLE001
                self.sync.report(e)
            if not self.sync.commit() or g is None:
                write_flat(self.params, self.theta_old)  # drop the round, as DiLoCo does
                self.sync.discarded("co2", self.local_step, "round average not committed")
                return
            applied_round = round_
        else:
            landed, self._pending = self._pending, None
            applied_round, g = (None, None) if landed is None else landed
            if g is not None:
                gap = -self.lr * self.momentum  # theta_old moved by this since round_-1 began
        if g is None:  # delay 1, first round (or the last one failed): theta_bar := theta_old
            theta_bar = self.theta_old.clone()
            g = torch.zeros_like(self.theta_old)
        else:
            # the start of g's round, minus its average Delta
            theta_bar = self.theta_old - g if gap is None else self.theta_old - gap - g
        lam = (
            staleness_penalty(gap, g, self._sizes, self.lam)
            if self.gap_penalty and gap is not None
            else self.lam
        )
        co2_outer_step(
            self.theta_old,
            self.momentum,
            theta_bar,
            beta=self.beta,
            lr=self.lr,
            lam=lam,
            clip=self.clip,
        )
        write_flat(self.params, self.theta_old)
        self.outer_steps += 1
        self.applied.append((self.local_step, applied_round))
        if applied_round is not None:  # checks over the round's members, nothing in flight yet
            self.sync.committed(self, self.local_step)
        if self.delay == 1:
            self._pending = (round_, self._reducer.submit(delta, comm=comm))

    # -- life cycle, metrics, state -------------------------------------------------------------
    def close(self) -> None:
        if self._pending is not None:  # let the in-flight reduction land; it stays pending
            round_, work = self._pending
            try:
                self._pending = (round_, self._reducer.result(work))
            except Exception as e:  # noqa: BLE001 - static: raised again; elastic: dropped
                self._pending = None
                self._reducer.close()
                self.sync.report(e)
        self._reducer.close()

    def metrics(self) -> dict[str, Any]:
        return {
            **super().metrics(),
            "outer_step": self.outer_steps,
            "peak_sync_bytes": self.peak_sync_bytes,
        }

    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:  # a checkpoint mid-flight keeps the (deterministic) result
            round_, work = self._pending
            delta = self._reducer.result(work)
            self._pending = (round_, delta)
            pending = {"round": round_, "delta": delta.clone()}
        return {
            **super().state_dict(),
            "theta_old": self.theta_old.clone(),
            "momentum": self.momentum.clone(),
            "outer_steps": self.outer_steps,
            "peak_sync_bytes": self.peak_sync_bytes,
            "pending": pending,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.theta_old.copy_(state["theta_old"])
        self.momentum.copy_(state["momentum"])
        self.outer_steps = int(state["outer_steps"])
        self.peak_sync_bytes = int(state["peak_sync_bytes"])
        p = state["pending"]
        device = self.theta_old.device
        self._pending = None if p is None else (int(p["round"]), p["delta"].to(device))
