"""Bit-parity of the shared state: hash it after every outer step, vote, repair the odd ones out.

Shared state (PCCL's term) is what every participant must hold bit-identically because it
advances deterministically, one revision per outer step: for DiLoCo the global parameters, the
outer optimizer's momentum and the outer step counter. A rank whose copy drifted (a flipped bit,
a missed step, a bug) would silently train a different model; `check_parity` finds and repairs it.

`check_parity(comm, state, step=...)`, called by every rank at the same point (after an outer step):

  1. Every rank hashes its shared state (sha256 of the exact bytes, `state_digest`) and all-gathers
     three int64s: (state digest, layout digest, byte count). 24 bytes per rank: when everyone
     agrees this is the only traffic.
  2. Every rank runs the same vote on the same gathered table: the digest held by the most ranks
     wins; a tie goes to the digest of the lowest rank among the tied ones. The source is the
     lowest rank holding the winning digest. Ranks holding another digest are "mismatched".
  3. Repair, point to point: the source sends its state (one flat byte buffer) to each mismatched
     rank in ascending rank order; each mismatched rank receives it once from the source and
     overwrites its tensors in place. Ranks that agree (other than the source) send nothing.

Deadlock freedom of step 3, step by step:
  * the source and the set of receivers are computed from the identical gathered table, with no
    further communication, so every rank agrees on who sends to whom and in which order;
  * the only edges are source -> receiver. The source posts its sends in ascending receiver order;
    every receiver posts exactly one recv, from the source, with the same tag, and waits for
    nothing else; so each send has a matching recv that is (or soon will be) posted, and there is
    no cycle of waits;
  * ranks outside the repair return at once and may enter the caller's next collective; that
    collective completes only once the source and receivers join it, which they do right after
    their transfers, which depend on no other rank. P2p tags and collective slots are separate
    in Gloo and NCCL, so the early collective cannot be mistaken for the repair.

A receiver whose tensor layout (dtypes and shapes) differs from the source's cannot be repaired in
place: it still receives (so the schedule stays uniform; it knows the source's byte count from the
table), reports `repaired=False`, and the caller must fall back to a full state transfer.

The shared-state protocol. Anything exposing

    shared_state() -> list[Tensor]        # live tensors, fixed order; overwritten in place on repair
    load_shared_state(tensors) -> None    # optional: refresh non-tensor fields after a repair

can be checked. `shared_state_of(algo)` returns the algorithm itself when it implements it, and
otherwise wraps DiLoCo / Streaming DiLoCo (`DiLoCoSharedState`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from lowband.algorithms.base import parameter_digest
from lowband.comm import Comm

log = logging.getLogger("lowband.fault")

PARITY_TAG = 0x50A7
"""P2p tag of the repair transfers (raw p2p tags never collide with collective slots)."""


@runtime_checkable
class SharedState(Protocol):
    """State every participant must hold bit-identically; see the module docstring."""

    def shared_state(self) -> list[torch.Tensor]: ...


def state_digest(tensors: Sequence[torch.Tensor]) -> int:
    """A 63-bit digest of the tensors' exact bytes (sha256): equal only for bit-identical values."""
    return parameter_digest([t.reshape(-1) for t in tensors])  # reshape: 0-dim tensors too


def layout_digest(tensors: Sequence[torch.Tensor]) -> int:
    """A 63-bit digest of the dtypes and shapes: equal when one state can be copied onto the other."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


class DiLoCoSharedState:
    """The shared state of DiLoCo / Streaming DiLoCo, as live tensors.

    Order: every global parameter (fragment by fragment), then the outer optimizer's momentum
    buffers that exist (a fragment has none before its first sync; every rank follows the same
    schedule, so the same ones exist everywhere), then the outer step counter as a 1-element int64.
    After a repair the counter is written back and the model parameters of the fragment synced
    last are reset to the repaired global parameters (what the outer step left there; with
    Streaming DiLoCo's mixing, alpha > 0, the rank's tau newer local steps of that fragment are
    dropped: it was the rank in the wrong).
    """

    def __init__(self, algo: Any) -> None:
        self.algo = algo
        self._counter = torch.zeros(1, dtype=torch.int64)

    def _globals(self) -> list[torch.Tensor]:
        return [g for frag in self.algo.global_params for g in frag]

    def shared_state(self) -> list[torch.Tensor]:
        globals_ = self._globals()
        state = self.algo.outer_opt.state
        buffers = [
            state[g]["momentum_buffer"]
            for g in globals_
            if g in state and state[g].get("momentum_buffer") is not None
        ]
        self._counter.fill_(int(self.algo.outer_steps))
        return [*globals_, *buffers, self._counter]

    @torch.no_grad()
    def load_shared_state(self, tensors: list[torch.Tensor]) -> None:
        algo = self.algo
        algo.outer_steps = int(self._counter.item())
        history = getattr(algo, "sync_history", None)
        last = history[-1][1] if history else None
        for f, (frag_globals, frag_params) in enumerate(zip(algo.global_params, algo.fragments)):
            if last is None or f == last:
                for g, p in zip(frag_globals, frag_params):
                    p.copy_(g.to(p.dtype))


def shared_state_of(algo: Any) -> SharedState:
    """The algorithm itself if it implements `shared_state()`, else a DiLoCo adapter."""
    if isinstance(algo, SharedState):
        return algo
    if all(hasattr(algo, a) for a in ("global_params", "outer_opt", "outer_steps")):
        return DiLoCoSharedState(algo)
    raise TypeError(
        f"{type(algo).__name__} has no shared state: implement shared_state() -> list[Tensor]"
    )


def shared_state_tensors(algo: Any) -> list[torch.Tensor]:
    """The live shared-state tensors of `algo` (see `shared_state_of`)."""
    return shared_state_of(algo).shared_state()


@dataclass
class ParityReport:
    """What one `check_parity` found; identical on every rank except `repaired`."""

    step: int
    digest: int
    """The winning digest (this rank's own when everyone agrees)."""
    mismatched: list[int] = field(default_factory=list)
    """Ranks whose digest differed from the winner's."""
    source: int | None = None
    """The rank the mismatched ones were repaired from (None when all agreed)."""
    repaired: bool = False
    """This rank was mismatched and now holds the winning bytes."""
    votes: int = 0
    """How many ranks held the winning digest."""

    @property
    def ok(self) -> bool:
        return not self.mismatched

    @property
    def event(self) -> dict[str, Any] | None:
        """The metrics/report event, or None when everyone agreed."""
        if self.ok:
            return None
        return {
            "event": "parity_mismatch",
            "step": self.step,
            "ranks": list(self.mismatched),
            "repaired_from": self.source,
            "votes": self.votes,
        }


def majority(digests: Sequence[int]) -> tuple[int, int]:
    """(winning digest, source rank): most votes; ties to the lowest rank holding a tied digest."""
    counts = Counter(digests)
    best = max(counts.values())
    source = next(r for r, d in enumerate(digests) if counts[d] == best)
    return digests[source], source


def _pack(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8).to(device) for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)


@torch.no_grad()
def _unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        nb = t.numel() * t.element_size()
        # clone: a byte slice may sit at an offset the wider dtype cannot be viewed at
        t.copy_(flat[offset : offset + nb].clone().view(t.dtype).reshape(t.shape))
        offset += nb


def check_parity(
    comm: Comm, state: SharedState | Sequence[torch.Tensor], *, step: int
) -> ParityReport:
    """Vote on the shared state's digest and repair the ranks that disagree (module docstring).

    `state` is a list of live tensors or an object with `shared_state()`; every rank must call
    this at the same point with the same layout. Returns the same report on every rank, with
    `repaired` set on the ranks that were fixed.
    """
    tensors = list(state.shared_state() if isinstance(state, SharedState) else state)
    digest = state_digest(tensors)
    if comm.size == 1:
        return ParityReport(step=step, digest=digest, votes=1)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    mine = torch.tensor(
        [digest, layout_digest(tensors), nbytes], dtype=torch.int64, device=comm.device
    )
    rows = [torch.empty_like(mine) for _ in range(comm.size)]
    comm.all_gather(rows, mine)
    table = [tuple(int(v) for v in row.cpu().tolist()) for row in rows]
    winner, source = majority([row[0] for row in table])
    report = ParityReport(step=step, digest=winner, votes=sum(row[0] == winner for row in table))
    report.mismatched = [r for r, row in enumerate(table) if row[0] != winner]
    if not report.mismatched:
        return report
    report.source = source

    if comm.rank == source:
        flat = _pack(tensors, comm.device)
        works = [comm.send(flat, dst, tag=PARITY_TAG, async_op=True) for dst in report.mismatched]
        for w in works:
            w.wait()
        log.info("parity step %d: sent shared state to ranks %s", step, report.mismatched)
    elif comm.rank in report.mismatched:
        _, src_layout, src_nbytes = table[source]
        flat = torch.empty(src_nbytes, dtype=torch.uint8, device=comm.device)
        comm.recv(flat, source, tag=PARITY_TAG)
        if table[comm.rank][1] != src_layout:
            log.error(
                "parity step %d: rank %d's shared state has another layout than rank %d's; "
                "cannot repair in place, a full state transfer is needed",
                step,
                comm.rank,
                source,
            )
            return report
        _unpack(flat, tensors)
        report.repaired = state_digest(tensors) == winner
        if report.repaired and hasattr(state, "load_shared_state"):
            state.load_shared_state(tensors)
        log.warning(
            "parity step %d: rank %d's shared state differed from the majority (%d of %d ranks); "
            "%s from rank %d",
            step,
            comm.rank,
            report.votes,
            comm.size,
            "repaired" if report.repaired else "repair FAILED",
            source,
        )
    return report
