"""NoLoCo: no all-reduce. Every H steps each replica averages with a small random group, by p2p only.

NoLoCo (Kolehmainen et al. 2025, arXiv 2506.10911), for every worker i, with theta_old_i its own
slow (outer) weights, theta_i its fast (local) weights and m_i its outer momentum:
  1. H inner steps of the user's optimizer move theta_i away from theta_old_i.
  2. A permutation seeded by (seed, outer round r) splits the n replicas into groups of g
     (`noloco_groups`; the last group absorbs the remainder, so 5 ranks with g = 2 make groups of
     2 and 3). Every worker computes it alike from the seed, without any coordination.
  3. Within its group G only, by point-to-point exchange (no collective over all replicas):
         phi_bar   = mean_{j in G} theta_old_j
         delta_bar = mean_{j in G} (theta_j - theta_old_j)
         m_i       <- beta * m_i + gamma * delta_bar + gamma * (phi_bar - theta_old_i)
         theta_old_i <- theta_old_i + m_i ;   theta_i <- theta_old_i
     (beta 0.5, gamma 0.7 in the configs; `noloco_outer_step_reference` is this rule verbatim).

Sign conventions. delta = theta - theta_old is the local progress (downhill), so momentum is
ADDED to theta_old (not subtracted as in DiLoCo, whose pseudo-gradient theta_g - theta_i has the
other sign); the second term pulls each replica toward its group's mean slow weights. This is the
form of ALGORITHMS.md and of the authors' public code (github.com/jkolehm/noloco,
src/noloco/sparse_optimizer_c.py: `m += (mu - 1) m + lr mean(p - p_old) + lr (mean(p_old) - p_old);
p_old += m; p = p_old`, so their outer_momentum is our beta and their outer_lr our gamma). The
paper's text (whose equation we could not read here) writes the update with a separate weight on
each term; with equal weights, as in the configs and the code, the two terms add up to
gamma * (mean_G theta_j - theta_old_i), because delta_bar + phi_bar = mean_G theta_j. So each
worker sends only its fast weights theta_j (one vector), half of what sending theta_old and delta
separately would cost.

Transport. theta_j travels through the codec (lowband.comm.codecs; fp32 = exact bytes). Note that
NoLoCo ships *parameters*, not pseudo-gradients: a codec's error is relative to the weights'
magnitude here, so bf16 (16) is the sensible floor; int8/int4 work but add noise of order
absmax/254 (resp. /14) per block to every round. Every member sums the decoded payloads of the
group (its own included) in ascending rank order, so all members compute the bit-identical mean.

Deadlock-freedom, step by step:
  1. Every member of G computes the same G (same seed, same round, same pure function) and the
     same payload size (same model), so for every send i -> j there is exactly one matching
     recv j <- i, with the same tag (the outer round, so rounds cannot cross).
  2. Each member first posts ALL its receives and sends asynchronously (`async_op=True`) and only
     then waits. No operation is waited for before every operation of that member is posted, so
     there is no cycle of "i waits for j to post": every posted send finds its posted recv.
  3. The posting order is also safe where operations run strictly one after the other in the
     order posted (NCCL p2p on one stream): each member takes its peers in ascending order, and
     per pair the lower rank sends then receives while the higher rank receives then sends. A
     member's pairs (min, max) then come in the global lexicographic order of pairs, the same
     order on every member, and the first unfinished pair in that order always has both its
     members at it with matching operations, so it completes; by induction all do.
  4. A member talks only to members of G, so a slow or dead replica outside G can delay nobody in
     G (tested with a deliberately slow rank). A dead partner inside G makes the wait raise
     Gloo's timeout (the process group's timeout) as a RuntimeError; it does not hang. Falling
     back to a live partner is elastic membership, a later feature.
The only collective is the one-time 8-byte digest check of `ensure_same_start` at construction.

With g >= n (one group of everybody), gamma = 1 and beta = 0 the rule is
theta_old <- mean_i theta_i on every worker: DiLoCo's averaging step with outer lr 1 and no
momentum (tests/test_noloco.py compares the two).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start, flat_params, write_flat
from lowband.comm import Comm, get_codec
from lowband.errors import ConfigError

__all__ = ["NoLoCo", "noloco_groups", "noloco_outer_step_reference"]


def noloco_groups(world_size: int, group_size: int, seed: int, round_: int) -> list[list[int]]:
    """The partition of ranks 0..world_size-1 used at outer round `round_`, identical everywhere.

    A permutation drawn from random.Random seeded by the string "noloco:{seed}:{round}" (stable
    across Python versions and platforms) is cut into max(1, n // g) consecutive groups of g; the
    last group takes the remainder (n = 5, g = 2 -> sizes 2 and 3; g >= n -> one group of n).
    Each group is sorted ascending.
    """
    if world_size < 1 or group_size < 1:
        raise ValueError(
            f"need world_size >= 1 and group_size >= 1, got {world_size}, {group_size}"
        )
    perm = list(range(world_size))
    random.Random(f"noloco:{seed}:{round_}").shuffle(perm)
    n_groups = max(1, world_size // group_size)
    cuts = [k * group_size for k in range(n_groups)] + [world_size]
    return [sorted(perm[a:b]) for a, b in zip(cuts, cuts[1:])]


@torch.no_grad()
def noloco_outer_step_reference(
    theta_old_i: torch.Tensor,
    momentum_i: torch.Tensor,
    group_theta_old: list[torch.Tensor],
    group_theta: list[torch.Tensor],
    beta: float,
    gamma: float,
) -> None:
    """The textbook outer update of worker i, in place on flat tensors (the test reference).

    group_theta_old / group_theta: every group member's slow and fast weights (i's included).
    """
    phi_bar = torch.stack(group_theta_old).mean(0)
    delta_bar = torch.stack([t - o for t, o in zip(group_theta, group_theta_old)]).mean(0)
    momentum_i.mul_(beta).add_(gamma * delta_bar + gamma * (phi_bar - theta_old_i))
    theta_old_i.add_(momentum_i)


class NoLoCo(Algorithm):
    """NoLoCo: random-group p2p averaging plus a modified Nesterov step. See the module docstring."""

    name = "noloco"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        comm: Comm,
        *,
        sync_every: int = 50,
        group_size: int = 2,
        beta: float = 0.5,
        gamma: float = 0.7,
        bits: int | str = 32,
        block_size: int = 64,
        seed: int = 0,
        broadcast_init: bool = True,
    ) -> None:
        super().__init__(model, optimizer, comm)
        if sync_every < 1:
            raise ConfigError(f"--sync-every must be at least 1, got {sync_every}")
        if group_size < 2:
            raise ConfigError(f"--group-size must be at least 2, got {group_size}")
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"NoLoCo beta (--outer-momentum) must be in [0, 1), got {beta}")
        if not 0.0 < gamma <= 1.0:
            raise ConfigError(f"NoLoCo gamma (--outer-lr) must be in (0, 1], got {gamma}")
        self.H, self.group_size, self.beta, self.gamma, self.seed = (
            sync_every,
            group_size,
            beta,
            gamma,
            seed,
        )
        self.codec = get_codec(bits, block_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if broadcast_init:
            ensure_same_start(comm, [[p.data for p in self.params]])
        self.theta_old = flat_params(self.params)  # this worker's slow weights, fp32
        self.momentum = torch.zeros_like(self.theta_old)
        self.outer_steps = 0
        self.peak_sync_bytes = 0
        self.group_history: list[tuple[int, list[int]]] = []  # (outer round, my group)

    # -- schedule -------------------------------------------------------------------------------
    def group_of(self, round_: int) -> list[int]:
        """This worker's group at outer round `round_` (rounds count from 1)."""
        groups = noloco_groups(self.comm.size, self.group_size, self.seed, round_)
        return next(g for g in groups if self.comm.rank in g)

    def step(self) -> None:
        super().step()
        if self.local_step % self.H == 0:
            self._outer_step(self.local_step // self.H)

    # -- the outer step -------------------------------------------------------------------------
    def _group_mean(self, theta: torch.Tensor, group: list[int], tag: int) -> torch.Tensor:
        """mean_{j in group} theta_j by p2p exchange; bit-identical on every member."""
        numel = theta.numel()
        payload = self.codec.encode(theta)
        peers = [j for j in group if j != self.comm.rank]
        inbox = {j: torch.empty_like(payload) for j in peers}
        # Post everything, then wait (deadlock-freedom, steps 2-3 of the module docstring).
        works = []
        for j in peers:  # ascending; per pair the lower rank sends first
            for op in ("send", "recv") if self.comm.rank < j else ("recv", "send"):
                if op == "send":
                    works.append(self.comm.send(payload, dst=j, tag=tag, async_op=True))
                else:
                    works.append(self.comm.recv(inbox[j], src=j, tag=tag, async_op=True))
        for w in works:
            w.wait()
        total = torch.zeros_like(theta)
        for j in group:  # ascending rank order, own payload decoded like the others
            total += self.codec.decode(payload if j == self.comm.rank else inbox[j], numel)
        return total / len(group)

    @torch.no_grad()
    def _outer_step(self, round_: int) -> None:
        group = self.group_of(round_)
        theta = flat_params(self.params)
        sent = (len(group) - 1) * self.codec.payload_bytes(theta.numel())
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        mean = self._group_mean(theta, group, tag=round_ % 2**31)
        # gamma*delta_bar + gamma*(phi_bar - theta_old_i) == gamma*(mean_G theta - theta_old_i)
        self.momentum.mul_(self.beta).add_(mean - self.theta_old, alpha=self.gamma)
        self.theta_old.add_(self.momentum)
        write_flat(self.params, self.theta_old)
        self.outer_steps += 1
        self.group_history.append((round_, group))

    # -- life cycle, metrics, state -------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        return {"outer_step": self.outer_steps, "peak_sync_bytes": self.peak_sync_bytes}

    def state_dict(self) -> dict[str, Any]:
        # The exchange is synchronous at the step boundary, so nothing is ever in flight here.
        return {
            **super().state_dict(),
            "theta_old": self.theta_old.clone(),
            "momentum": self.momentum.clone(),
            "outer_steps": self.outer_steps,
            "peak_sync_bytes": self.peak_sync_bytes,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.theta_old.copy_(state["theta_old"])
        self.momentum.copy_(state["momentum"])
        self.outer_steps = int(state["outer_steps"])
        self.peak_sync_bytes = int(state["peak_sync_bytes"])
