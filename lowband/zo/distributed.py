"""Distributed zeroth-order training with shared randomness: one scalar per rank per step.

Each step (ALGORITHMS.md "Zeroth-order with shared randomness"; MeZO, Just One Byte):
  1. rank r draws seed_r = seed_for(run seed, step, r) and, on its own batch, the two-point
     estimate g_r (lowband.zo.spsa.spsa_grad, exact restore).
  2. it encodes g_r (1 byte log scale, or 4 bytes fp32; lowband.zo.codec) and all-gathers the
     codes through `comm.all_gather`, the only bytes that cross the network.
  3. every rank decodes all n codes (its own too) and applies the n updates in rank order,
     regenerating each z_r from seed_r.
Why ranks stay bit-identical: they start identical, step 1 leaves each rank's parameters
exactly as they were (restore by copy), and step 3 runs the same floating-point operations in
the same order on the same inputs (decoded scalars, seeds) on every rank.

Bytes. Under lowband's accounting (lowband.comm.accounting.all_gather_traffic) a ring
all-gather of k bytes per rank charges every rank (n-1)*k bytes sent and (n-1)*k received:
k = 1 (bits=8) or 4 (bits=32). The payload contributed per step is n*k bytes across ranks.

Log and replay. Every step appends (step, rank, seed, code) for all ranks to an append-only
`ZOLog`. `replay(model, log)` re-applies those updates to a checkpoint and reproduces the
parameters bit for bit: a newcomer holding the initial (or any logged) checkpoint catches up from
the log alone, without a model transfer.
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

from lowband.comm import Comm
from lowband.zo import codec
from lowband.zo.spsa import LossFn, apply_update_, spsa_grad


def seed_for(run_seed: int, step: int, rank: int) -> int:
    """A stable 63-bit seed from (run seed, step, rank); Python's hash() is salted per process."""
    digest = hashlib.blake2b(struct.pack("<qqq", run_seed, step, rank), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class ZOEntry:
    step: int
    rank: int
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
        d["entries"] = [[e.step, e.rank, e.seed, e.code.hex()] for e in self.entries]
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> ZOLog:
        d = json.loads(text)
        entries = [ZOEntry(s, r, seed, bytes.fromhex(c)) for s, r, seed, c in d.pop("entries")]
        return cls(**d, entries=entries)


def apply_entries_(
    params: nn.Module | Iterable[torch.Tensor], log: ZOLog, entries: Iterable[ZOEntry]
) -> None:
    params = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    for e in entries:
        g = codec.decode(e.code, log.bits, center=log.center)
        apply_update_(params, e.seed, g, log.lr, log.wd)


def replay(model: nn.Module, log: ZOLog, *, from_step: int = 0) -> None:
    """Apply the log's updates with step >= from_step, in log order, to `model` in place.

    `model` must hold the parameters as they were before step `from_step`.
    """
    apply_entries_(model, log, (e for e in log.entries if e.step >= from_step))


class ZOTrainer:
    """Data-parallel MeZO over `comm`: each rank sends one encoded scalar per step.

    Usage (every rank, same `seed`, its own batches):
        zo = ZOTrainer(model, comm, lr=1e-4, eps=1e-3, seed=0)
        for step in range(n): zo.step(loss_fn, next(batches), step)
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
        log: ZOLog | None = None,
    ) -> None:
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        self.model, self.comm, self.eps, self.seed = model, comm, eps, seed
        self.log = log if log is not None else ZOLog(lr=lr, wd=wd, bits=bits, center=center)
        """Append-only: (step, rank, seed, code) of every update applied, in order."""
        self._params = list(model.parameters())

    def step(self, loss_fn: LossFn, batch: Any, step: int) -> list[float]:
        """One ZO step; returns the decoded scalars of all ranks (rank order)."""
        log, comm = self.log, self.comm
        seeds = [seed_for(self.seed, step, r) for r in range(comm.size)]
        g = spsa_grad(self.model, loss_fn, batch, seeds[comm.rank], self.eps, restore="copy")
        code = codec.encode(g, log.bits, center=log.center)
        mine = torch.tensor(list(code), dtype=torch.uint8, device=comm.device)
        outputs = [torch.empty_like(mine) for _ in range(comm.size)]
        comm.all_gather(outputs, mine)
        entries = [
            ZOEntry(step, r, seeds[r], bytes(out.cpu().tolist())) for r, out in enumerate(outputs)
        ]
        for e in entries:
            log.append(e)
        apply_entries_(self._params, log, entries)
        return [codec.decode(e.code, log.bits, center=log.center) for e in entries]
