"""Helpers for tests: n ranks as threads of one process, each with its own Gloo process group;
and a sync group whose rounds fail on cue (FakeGroup), for the algorithms' fault paths.

Threads start in milliseconds where processes take seconds to import torch, so most multi-rank
tests run this way (as torchft's do). Gloo and torch release the GIL in their kernels.
"""

from __future__ import annotations

import datetime
import threading
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lowband.comm import Comm, LinkMap, LinkSpec
from lowband.comm.sync import SyncGroup


def gloo_groups(
    n: int, timeout_s: float = 60.0, prefix: str = "g"
) -> Callable[[int], dist.ProcessGroup]:
    """Returns make(rank) -> a Gloo group of n ranks sharing an in-process store."""
    store = dist.HashStore()

    def make(rank: int) -> dist.ProcessGroup:
        return dist.ProcessGroupGloo(
            dist.PrefixStore(prefix, store), rank, n, datetime.timedelta(seconds=timeout_s)
        )

    return make


def run_ranks(
    n: int,
    fn: Callable[..., Any],
    *args: Any,
    link: LinkSpec | LinkMap | None = None,
    timeout_s: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run fn(comm, *args, **kwargs) on n threads, one Comm each; return their results by rank.

    An exception on any rank is re-raised here with that rank's traceback.
    """
    make = gloo_groups(n, timeout_s=timeout_s)
    results: list[Any] = [None] * n
    errors: list[str] = []

    def body(rank: int) -> None:
        try:
            comm = Comm(make(rank) if n > 1 else None, link)
            results[rank] = fn(comm, *args, **kwargs)
        except BaseException:  # noqa: BLE001 - reported below with the rank
            errors.append(f"rank {rank}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"run_ranks: a rank did not finish within {timeout_s}s")
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


class InjectedFault(RuntimeError):
    """The error a FaultyComm raises (a test's injected reduction failure)."""


class _FaultyWork:
    def __init__(self, work: Any, comm: FaultyComm) -> None:
        self._work, self._comm = work, comm

    def wait(self) -> None:
        self._work.wait()
        if self._comm.armed:
            self._comm.armed = False
            raise InjectedFault("injected: this rank lost the reduction's result")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class FaultyComm(Comm):
    """A Comm whose next reduction, once `armed`, completes on the wire (so no peer hangs) and
    then raises on this rank, as a reduction whose result was lost. Armed faults fire at the wait
    of an all_reduce, an all_gather or a recv: the last operation of every reduction lowband
    runs (a quantized all-reduce's all_to_all is followed by its all_gather)."""

    LAST_OPS = ("all_reduce", "all_gather", "recv")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False

    def _issue(self, op, traffic, launch, async_op, finish=None, **timing):
        work = super()._issue(op, traffic, launch, async_op=True, finish=finish, **timing)
        if op in self.LAST_OPS:
            work = _FaultyWork(work, self)
        if not async_op:
            work.wait()
        return work


class FakeGroup(SyncGroup):
    """An elastic-like sync group for fast unit tests: rounds over a real (threaded) Gloo group
    that fail where the test says, with torchft's semantics (a commit is every member's vote:
    one member's error means nobody commits), and a record of what happened.

    fail_reduce / fail_commit: the round numbers (from 1) at which THIS rank's reduction raises
    (FaultyComm) or its commit vote is "no".
    """

    elastic = True

    def __init__(self, comm: Comm, fail_reduce=(), fail_commit=()) -> None:
        self.comm = FaultyComm(comm.group, comm.link_map or comm.link, stats=comm.stats)
        self.fail_reduce, self.fail_commit = set(fail_reduce), set(fail_commit)
        self.round = 0
        self.error: BaseException | None = None
        self.votes: list[tuple[int, bool]] = []
        """(round, committed) of every round, in order."""
        self.digests: list[tuple[int, int]] = []
        """(round, digest of the shared state) after every committed round that has one."""
        self.discards: list[tuple[str, int]] = []

    def begin(self) -> Comm:
        self.round += 1
        self.error = None
        self.comm.armed = self.round in self.fail_reduce
        return self.comm

    def report(self, error: BaseException) -> None:
        self.error = error

    def commit(self) -> bool:
        self.comm.armed = False
        ok = self.error is None and self.round not in self.fail_commit
        vote = torch.tensor([1.0 if ok else 0.0])
        self.comm.all_reduce(vote, op="min")
        self.votes.append((self.round, bool(vote.item())))
        return bool(vote.item())

    def committed(self, shared: Any, step: int) -> None:
        if shared is not None:
            from lowband.fault.parity import shared_state_of, state_digest

            self.digests.append((self.round, state_digest(shared_state_of(shared).shared_state())))

    def discarded(self, kind: str, step: int, reason: str) -> None:
        self.discards.append((kind, step))
