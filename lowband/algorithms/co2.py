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

from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start, flat_params, write_flat
from lowband.algorithms.overlap import BackgroundReducer
from lowband.comm import Comm, get_codec, quantized_all_reduce
from lowband.comm.quantized import quantized_all_reduce_bytes
from lowband.errors import ConfigError

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


class CO2(Algorithm):
    """CO2 with one-round-delayed (delay=1) or synchronous (delay=0) averaging. See the module docstring."""

    name = "co2"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        comm: Comm,
        *,
        sync_every: int = 48,
        beta: float = 0.5,
        outer_lr: float = 1.0,
        lam: float = 1.0,
        clip: float | None = 1.0,
        bits: int | str = 32,
        block_size: int = 64,
        delay: int = 1,
        gap_penalty: bool = False,
        broadcast_init: bool = True,
    ) -> None:
        super().__init__(model, optimizer, comm)
        if sync_every < 1:
            raise ConfigError(f"--sync-every must be at least 1, got {sync_every}")
        if delay not in (0, 1):
            raise ConfigError(f"--co2-delay must be 0 (synchronous) or 1 (overlapped), got {delay}")
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"CO2 beta (--outer-momentum) must be in [0, 1), got {beta}")
        if not outer_lr > 0:
            raise ConfigError(f"CO2 outer lr (--outer-lr) must be positive, got {outer_lr}")
        if not lam > 0:
            raise ConfigError(f"--co2-lambda must be positive, got {lam}")
        if clip is not None and clip < 0:
            raise ConfigError(f"--co2-clip must be >= 0 (0 turns clipping off), got {clip}")
        self.H, self.beta, self.lr, self.lam, self.clip = sync_every, beta, outer_lr, lam, clip
        self.delay, self.gap_penalty = delay, gap_penalty
        self.codec = get_codec(bits, block_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._sizes = [p.numel() for p in self.params]
        if broadcast_init:
            ensure_same_start(comm, [[p.data for p in self.params]])
        self.theta_old = flat_params(self.params)  # identical on every worker
        self.momentum = torch.zeros_like(self.theta_old)
        self.outer_steps = 0
        self.peak_sync_bytes = 0
        self.applied: list[tuple[int, int | None]] = []  # (local step, round whose average applied)
        self._reducer = BackgroundReducer(comm, self.codec)
        self._pending: tuple[int, Any] | None = None  # (round, future or averaged Delta)

    # -- the hook after every inner step --------------------------------------------------------
    def step(self) -> None:
        super().step()
        if self.local_step % self.H == 0:
            self._outer_step(self.local_step // self.H)

    @torch.no_grad()
    def _outer_step(self, round_: int) -> None:
        delta = self.theta_old - flat_params(self.params)  # this worker's Delta for round_
        sent = quantized_all_reduce_bytes(delta.numel(), self.comm.size, self.codec)
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        gap = torch.zeros_like(self.theta_old)
        if self.delay == 0:
            applied_round, g = round_, quantized_all_reduce(self.comm, delta, self.codec, "avg")
        else:
            previous, self._pending = self._pending, (round_, self._reducer.submit(delta))
            if previous is None:
                applied_round, g = None, None
            else:
                applied_round, g = previous[0], self._reducer.result(previous[1])
                gap = -self.lr * self.momentum  # theta_old moved by this since round_-1 began
        if g is None:  # delay 1, first round: nothing landed, theta_bar := theta_old
            theta_bar = self.theta_old.clone()
            g = torch.zeros_like(self.theta_old)
        else:
            theta_bar = self.theta_old - gap - g  # the start of g's round, minus its average Delta
        lam = staleness_penalty(gap, g, self._sizes, self.lam) if self.gap_penalty else self.lam
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

    # -- life cycle, metrics, state -------------------------------------------------------------
    def close(self) -> None:
        if self._pending is not None:  # let the in-flight reduction land; it stays pending
            self._pending = (self._pending[0], self._reducer.result(self._pending[1]))
        self._reducer.close()

    def metrics(self) -> dict[str, Any]:
        return {"outer_step": self.outer_steps, "peak_sync_bytes": self.peak_sync_bytes}

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
