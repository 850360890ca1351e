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
     Gloo's timeout (the process group's timeout) as a RuntimeError; it does not hang. In a
     static group that error fails the run; in an elastic one (lowband.fault.elastic) it is
     reported, the member averages with the partners that answered, and the next quorum is
     drawn without the lost worker.
The only collective is the one-time 8-byte digest check of `ensure_same_start` at construction.

With g >= n (one group of everybody), gamma = 1 and beta = 0 the rule is
theta_old <- mean_i theta_i on every worker: DiLoCo's averaging step with outer lr 1 and no
momentum (tests/test_noloco.py compares the two).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start, flat_params, write_flat
from lowband.algorithms.registry import OptionError, check_bits
from lowband.comm import Comm, get_codec
from lowband.comm.sync import SyncGroup

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


@dataclasses.dataclass(kw_only=True)
class NoLoCoOptions:
    """Options of --algo noloco."""

    sync_every: int = 60
    """Inner steps between outer steps (H)."""
    group_size: int = 2
    """Replicas per averaging group, redrawn every outer step from --seed and the round; the last group takes the remainder, so odd --workers work."""
    outer_lr: float = 0.7
    """gamma: the weight of the group's mean in the outer update, in (0, 1]."""
    outer_momentum: float = 0.5
    """beta: the outer momentum, in [0, 1)."""
    bits: int = 32
    """Bits per parameter value on the wire: 32, 16 (bf16, the sensible floor for parameters), 8 or 4."""

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise OptionError(f"{{sync_every}} must be at least 1, got {self.sync_every}")
        if self.group_size < 2:
            raise OptionError(f"{{group_size}} must be at least 2, got {self.group_size}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise OptionError(
                f"NoLoCo beta ({{outer_momentum}}) must be in [0, 1), got {self.outer_momentum}"
            )
        if not 0.0 < self.outer_lr <= 1.0:
            raise OptionError(f"NoLoCo gamma ({{outer_lr}}) must be in (0, 1], got {self.outer_lr}")
        check_bits(self.bits)


class NoLoCo(Algorithm):
    """NoLoCo: random-group p2p averaging plus a modified Nesterov step. See the module docstring."""

    name = "noloco"
    Options = NoLoCoOptions

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group: Comm | SyncGroup,
        *,
        block_size: int = 64,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(model, optimizer, group)
        self.options = opts = NoLoCoOptions(**options)
        self.H, self.group_size, self.seed = opts.sync_every, opts.group_size, seed
        self.beta, self.gamma = opts.outer_momentum, opts.outer_lr
        self.codec = get_codec(opts.bits, block_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        ensure_same_start(self.comm, [[p.data for p in self.params]])
        self.theta_old = flat_params(self.params)  # this worker's slow weights, fp32
        self.momentum = torch.zeros_like(self.theta_old)
        self.outer_steps = 0
        self.peak_sync_bytes = 0
        self.group_history: list[tuple[int, list[int]]] = []  # (outer round, my group)

    @classmethod
    def from_options(cls, model, optimizer, group, options, setup) -> NoLoCo:
        return cls(model, optimizer, group, seed=setup.seed, **dataclasses.asdict(options))

    # -- schedule -------------------------------------------------------------------------------
    def group_of(self, round_: int) -> list[int]:
        """This worker's group at outer round `round_` (rounds count from 1)."""
        groups = noloco_groups(self.comm.size, self.group_size, self.seed, round_)
        return next(g for g in groups if self.comm.rank in g)

    def step(self) -> None:
        if self.joining:  # a newcomer: heal at its peers' round boundary, then exchange
            self.join()
            return
        super().step()
        if self.local_step % self.H == 0:
            self._sync_round(self.local_step // self.H)

    # -- the outer step -------------------------------------------------------------------------
    def _group_mean(
        self, theta: torch.Tensor, group: list[int], tag: int
    ) -> tuple[torch.Tensor, list[int]]:
        """mean_{j in group} theta_j by p2p exchange, bit-identical on every member that heard
        from the same partners; also returns the partners that did not answer.

        A failed transfer goes to the sync group: a static group re-raises it (the run fails, as
        a collective's would); an elastic one reports it and the mean is taken over the partners
        that answered (alone, if none did).
        """
        numel = theta.numel()
        payload = self.codec.encode(theta)
        me = self.comm.rank
        peers = [j for j in group if j != me]
        inbox = {j: torch.empty_like(payload) for j in peers}
        works: list[tuple[int, Any]] = []
        lost: set[int] = set()
        # Post everything, then wait (deadlock-freedom, steps 2-3 of the module docstring).
        for j in peers:  # ascending; per pair the lower rank sends first
            for op in ("send", "recv") if me < j else ("recv", "send"):
                try:
                    if op == "send":
                        works.append((j, self.comm.send(payload, dst=j, tag=tag, async_op=True)))
                    else:
                        works.append((j, self.comm.recv(inbox[j], src=j, tag=tag, async_op=True)))
                except Exception as e:  # noqa: BLE001 - the partner is already gone
                    lost.add(j)
                    self.sync.report(e)
        for j, w in works:
            try:
                w.wait()
            except Exception as e:  # noqa: BLE001 - died or hung mid-exchange
                lost.add(j)
                self.sync.report(e)
        total = torch.zeros_like(theta)
        members = [j for j in group if j not in lost]
        for j in members:  # ascending rank order, own payload decoded like the others
            total += self.codec.decode(payload if j == me else inbox[j], numel)
        return total / len(members), sorted(lost)

    @torch.no_grad()
    def _continue_round(self, round_: int) -> None:
        round_ = self.local_step // self.H  # a heal moves this worker to its source's round
        group = self.group_of(round_)
        theta = flat_params(self.params)
        sent = (len(group) - 1) * self.codec.payload_bytes(theta.numel())
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        mean, lost = self._group_mean(theta, group, tag=round_ % 2**31)
        # Replicas differ by design, so a round whose exchange partly failed is still applied
        # (over the partners that answered); the commit only advances the group's counter.
        self.sync.commit()
        if lost:
            self.sync.event(
                {"event": "partner_lost", "round": round_, "lost": lost, "group": group}
            )
        # gamma*delta_bar + gamma*(phi_bar - theta_old_i) == gamma*(mean_G theta - theta_old_i)
        self.momentum.mul_(self.beta).add_(mean - self.theta_old, alpha=self.gamma)
        self.theta_old.add_(self.momentum)
        write_flat(self.params, self.theta_old)
        self.outer_steps += 1
        self.group_history.append((round_, group))
        # No committed() checks: replicas differ by design (no parity), and NoLoCo issues no
        # collective over all replicas (so no detector exchange either).

    # -- life cycle, metrics, state -------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        return {
            **super().metrics(),
            "outer_step": self.outer_steps,
            "peak_sync_bytes": self.peak_sync_bytes,
        }

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
