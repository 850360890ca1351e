"""Distributed zeroth-order training with shared randomness: a few bytes per rank per step.

Slots. A step draws `samples` perturbations per *group*; slot k = group * samples + j has seed
seed_for(run seed, step, k). The step's update is the mean over all m slots (ALGORITHMS.md):
    theta <- theta - lr * (1/m * sum_k g_k z_k + wd * theta),
computed as theta *= 1 - lr wd, then theta += (-lr g_k / m) z_k for k = 0, 1, ... in slot order
(`apply_step_`). The mean makes it the average of the m single-slot updates, so more workers
lower the variance of a step, as a bigger batch does, rather than lengthening it.

Modes (DistZO2, Wang et al. 2025: data parallel, perturbation parallel, and both, "2-D"):
  data parallel (default): a group is one rank. Rank r, on its own batch, computes both losses
      of each of its slots (lowband.zo.spsa.spsa_losses, exact restore), g = (L+ - L-)/(2 eps),
      encodes each g (1 byte log scale or 4 bytes fp32; lowband.zo.codec) and all-gathers the
      codes: `samples` codes per rank, the only bytes that cross the network.
  perturbation parallel (`perturb_parallel=True`, an even number of ranks): ranks 2i and 2i+1 form
      group i and share its batch and seeds. Rank 2i computes only L(theta + eps z), rank 2i+1
      only L(theta - eps z): one forward per slot each instead of two. The pair swaps its fp32
      losses (send/recv, 4 bytes per slot each way), both compute the same g, and the all-gather
      of codes then runs over all ranks as above. With two ranks this is DistZO2's PertP; with 2G
      ranks it is its 2-D scheme (PertP inside each pair x data parallel across the G pairs).
      Both ranks of a pair contribute their (identical) codes, so one world-wide collective does
      without sub-communicators; every rank checks that the two agree, which they must, since
      both computed g from the same two floats.
Every rank decodes all codes (its own too) and applies the m updates in slot order, regenerating
each z_k from its seed.

Why ranks stay bit-identical: they start identical (the constructor proves it with one 8-byte
digest per rank, and broadcasts rank 0's parameters only if they differ, as every algorithm does:
lowband.algorithms.base.ensure_same_start); the exact restore leaves each rank's
parameters as they were; and the update runs the same floating-point operations in the same
order on the same inputs (decoded scalars, seeds) on every rank.

Why the modes equal the single-process reference bit for bit (fp32 or any dtype): a slot's L+ is
computed at round(theta + eps z) and its L- at round(theta - eps z) whichever rank computes them
(lowband.zo.spsa.perturbed_loss), on the same batch; g comes from the one formula `two_point`;
the update is `apply_step_`. A loss crosses the pair as fp32, which is exact for our models'
fp32 losses (a loss_fn returning fp64 would be rounded on both ranks alike, so the pair still
agrees, but no longer matches an fp64 reference bit for bit).

Bytes (lowband.comm.accounting): the ring all-gather of k*samples bytes per rank (k = 1 for
bits=8, 4 for bits=32) charges every rank (n-1)*k*samples sent and as many received; the payload
contributed per step is n*k*samples bytes. Perturbation parallelism adds 4*samples bytes sent and
received per rank for the pair's loss swap.

Log and replay. Every step appends (step, slot, seed, code) for every slot to an append-only
`ZOLog`. `replay(model, log)` re-applies those updates and reproduces the parameters bit for bit:
a newcomer or restarted worker holding the starting (or any logged) checkpoint catches up from
the log alone, without a model transfer; the number of workers may differ before and after.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import ensure_same_start
from lowband.comm import Comm
from lowband.zo import codec
from lowband.zo.spsa import LossFn, Restore, noise, perturbed_loss, spsa_losses, two_point


def seed_for(run_seed: int, step: int, slot: int) -> int:
    """A stable 63-bit seed from (run seed, step, slot); Python's hash() is salted per process."""
    digest = hashlib.blake2b(struct.pack("<qqq", run_seed, step, slot), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class ZOEntry:
    step: int
    slot: int
    """group * samples + j: the order in which the step's updates are applied."""
    seed: int
    code: bytes
    """The encoded scalar exactly as it went over the wire."""


@dataclass
class ZOLog:
    """Append-only record of every applied update, plus what is needed to decode and apply it."""

    lr: float
    wd: float
    bits: int
    center: int = 0
    entries: list[ZOEntry] = field(default_factory=list)

    def append(self, entry: ZOEntry) -> None:
        self.entries.append(entry)

    def to_json(self) -> str:
        d = asdict(self)
        d["entries"] = [[e.step, e.slot, e.seed, e.code.hex()] for e in self.entries]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> ZOLog:
        d = json.loads(text)
        entries = [ZOEntry(s, r, seed, bytes.fromhex(c)) for s, r, seed, c in d.pop("entries")]
        return cls(**d, entries=entries)

    def steps(self) -> list[int]:
        """The steps the log holds, in order."""
        return sorted({e.step for e in self.entries})


@torch.no_grad()
def apply_step_(
    params: nn.Module | Iterable[torch.Tensor], log: ZOLog, entries: list[ZOEntry]
) -> None:
    """One step's update: theta *= 1 - lr wd; then theta += (-lr g_k / m) z_k in entry order.

    The mean over the m entries of the single-entry update theta -= lr (g_k z_k + wd theta).
    """
    params = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    if not entries:
        return
    m = len(entries)
    if log.wd:
        for p in params:
            p.mul_(1.0 - log.lr * log.wd)
    for e in entries:
        g = codec.decode(e.code, log.bits, center=log.center)
        for p, z in noise(params, e.seed):
            p.add_(z, alpha=-log.lr * g / m)


def replay(model: nn.Module, log: ZOLog, *, from_step: int = 0) -> int:
    """Apply the log's steps >= from_step, in order, to `model` in place; returns the last step
    applied (from_step - 1 if none). `model` must hold the parameters as they were before
    step `from_step`."""
    by_step: dict[int, list[ZOEntry]] = {}
    for e in log.entries:
        if e.step >= from_step:
            by_step.setdefault(e.step, []).append(e)
    params = list(model.parameters())
    for step in sorted(by_step):
        apply_step_(params, log, by_step[step])
    return max(by_step, default=from_step - 1)


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean of (L+ + L-)/2 over this rank's group's slots: the training loss near theta."""
    grads: list[float]
    """Decoded projected gradients of all slots, in slot order."""


class ZOTrainer:
    """Distributed MeZO over `comm` (data parallel, perturbation parallel or 2-D; see above).

    Usage (every rank, same `seed`; each group its own batches, see `group`):
        zo = ZOTrainer(model, comm, lr=1e-4, eps=1e-3, seed=0, samples=1)
        for step in range(n): zo.step(loss_fn, next(batches_of_group), step)
    """

    def __init__(
        self,
        model: nn.Module,
        comm: Comm,
        *,
        lr: float,
        eps: float,
        wd: float = 0.0,
        bits: int = 8,
        seed: int = 0,
        center: int = 0,
        samples: int = 1,
        perturb_parallel: bool = False,
        restore: Restore = "copy",
        log: ZOLog | None = None,
    ) -> None:
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        if perturb_parallel and comm.size % 2:
            raise ValueError(
                f"perturbation parallelism pairs ranks: needs an even count, got {comm.size}"
            )
        if restore == "arith":
            raise ValueError(
                "distributed ZO needs an exact restore ('copy' or 'host'): see spsa.py"
            )
        self.model, self.comm, self.eps, self.seed = model, comm, eps, seed
        self.samples, self.perturb_parallel, self.restore = samples, perturb_parallel, restore
        self.log = log if log is not None else ZOLog(lr=lr, wd=wd, bits=bits, center=center)
        """Append-only: (step, slot, seed, code) of every update applied, in order."""
        self._params = list(model.parameters())
        # Ranks that start apart would drift apart silently: every update is applied locally.
        self.broadcast_at_start = ensure_same_start(comm, [[p.data for p in self._params]])
        """Whether the ranks started with different parameters and took rank 0's."""
        self.groups = comm.size // 2 if perturb_parallel else comm.size
        """Groups that each draw their own batch and seeds (ranks in data parallel, pairs in 2-D)."""
        self.group = comm.rank // 2 if perturb_parallel else comm.rank
        """This rank's group: feed it batch `group` of `groups` (e.g. ShardSampler(rank=group))."""

    def _seeds(self, step: int, group: int) -> list[int]:
        return [seed_for(self.seed, step, group * self.samples + j) for j in range(self.samples)]

    def _losses(self, loss_fn: LossFn, batch: Any, seeds: list[int]) -> list[tuple[float, float]]:
        """(L+, L-) of each seed: both here (data parallel) or half here, half from the partner."""
        model, eps = self.model, self.eps
        if not self.perturb_parallel:
            return [spsa_losses(model, loss_fn, batch, s, eps, restore=self.restore) for s in seeds]
        sign = 1.0 if self.comm.rank % 2 == 0 else -1.0
        mine = torch.tensor(
            [
                perturbed_loss(model, loss_fn, batch, s, sign * eps, restore=self.restore)
                for s in seeds
            ],
            dtype=torch.float32,
            device=self.comm.device,
        )
        theirs = torch.empty_like(mine)
        partner = self.comm.rank ^ 1
        # Both sends are posted before either waits, so neither rank blocks the other.
        sent = self.comm.send(mine, partner, async_op=True)
        got = self.comm.recv(theirs, partner, async_op=True)
        sent.wait()
        got.wait()
        plus, minus = (mine, theirs) if sign > 0 else (theirs, mine)
        return list(zip(plus.cpu().tolist(), minus.cpu().tolist(), strict=True))

    def step(self, loss_fn: LossFn, batch: Any, step: int) -> StepResult:
        """One ZO step on this group's `batch`."""
        log, comm, k = self.log, self.comm, codec.nbytes(self.log.bits)
        seeds = self._seeds(step, self.group)
        losses = self._losses(loss_fn, batch, seeds)
        codes = b"".join(
            codec.encode(two_point(lp, lm, self.eps), log.bits, center=log.center)
            for lp, lm in losses
        )
        mine = torch.tensor(list(codes), dtype=torch.uint8, device=comm.device)
        outputs = [torch.empty_like(mine) for _ in range(comm.size)]
        comm.all_gather(outputs, mine)
        gathered = [bytes(out.cpu().tolist()) for out in outputs]
        per_group = gathered[::2] if self.perturb_parallel else gathered
        if self.perturb_parallel and gathered[1::2] != per_group:
            bad = [2 * i for i, (a, b) in enumerate(zip(per_group, gathered[1::2])) if a != b]
            raise RuntimeError(f"perturbation pairs starting at ranks {bad} disagree on g")
        entries = [
            ZOEntry(step, g * self.samples + j, seed, per_group[g][j * k : (j + 1) * k])
            for g in range(self.groups)
            for j, seed in enumerate(self._seeds(step, g))
        ]
        for e in entries:
            log.append(e)
        apply_step_(self._params, log, entries)
        return StepResult(
            loss=sum(lp + lm for lp, lm in losses) / (2 * len(losses)),
            grads=[codec.decode(e.code, log.bits, center=log.center) for e in entries],
        )
