"""Sync groups: where an algorithm's synchronisation rounds run, static or elastic.

Every algorithm writes its synchronisation once, against this interface, in the shape torchft's
Manager gives a fault-tolerant step (start_quorum, reduce, should_commit):

    comm = self.sync.begin()            # 1. open a round: the Comm to reduce over this round
    try:
        avg = reduce(x * self.sync.scale, comm)   # 2. reduce; this worker's share scaled
    except Exception as e:
        self.sync.report(e)             #    errors go to the group
    if self.sync.commit():              # 3. everybody's round succeeded?
        apply(avg)                      # 4a. apply, then, with nothing in flight,
        self.sync.committed(self)       #     the group's checks on the shared state
    else:
        roll_back()                     # 4b. or discard the round (never applied twice)

`StaticGroup` is a fixed process group: `begin` returns its Comm, `scale` is 1, `report` re-raises
(a failed collective fails the run, as it always has), `commit` is always True. An algorithm built
on a plain `Comm` gets one, so `DiLoCo(model, opt, comm)` behaves exactly as before.

`lowband.fault.elastic.ElasticGroup` is the torchft form: `begin` is a quorum (which may heal this
worker by loading a live peer's whole training state, and may change the members), `scale` leaves
out a worker that has just healed, `report` hands the error to torchft, `commit` is torchft's
should_commit, and `committed` runs the bit-parity check and the slow-rank detector over the
quorum. The algorithm's code is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lowband.comm.group import Comm

EventSink = Callable[[dict[str, Any]], None]


class SyncGroup:
    """The interface (module docstring). Subclasses: StaticGroup, fault.elastic.ElasticGroup."""

    elastic = False
    comm: Comm

    def begin(self) -> Comm:
        """Open a synchronisation round; return the Comm to reduce over in it."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """Factor on this worker's contribution to an average, so that the average is over the
        workers that really trained this round (0 for one that has just received a peer's state)."""
        return 1.0

    @property
    def contributing(self) -> list[bool]:
        """Per rank of this round's Comm: does its update count? (robust rules drop the others)."""
        return [True] * self.comm.size

    @property
    def members(self) -> list[int]:
        """Per rank of this round's Comm: the worker's fixed index (its seat in the job)."""
        return list(range(self.comm.size))

    def report(self, error: BaseException) -> None:
        """A reduction of this round failed on this worker."""
        raise error

    def commit(self) -> bool:
        """Close the round: True when every member's round succeeded and the update may apply."""
        return True

    def committed(self, shared: Any, step: int) -> None:
        """After a committed update is applied, with no collective in flight: checks over the
        round's members (`shared` exposes shared_state() -> list[Tensor], or is None)."""

    def discarded(self, kind: str, step: int, reason: str) -> None:
        """A round was rolled back (only an elastic group ever does)."""

    def event(self, event: dict[str, Any]) -> None:
        """Something worth a line in the run's metrics (only an elastic group has any today)."""

    def metrics(self) -> dict[str, Any]:
        """Fields for the metrics line."""
        return {}


class StaticGroup(SyncGroup):
    """A fixed process group: every round commits, every error is raised."""

    def __init__(self, comm: Comm, on_event: EventSink | None = None) -> None:
        self.comm = comm
        self._on_event = on_event

    def begin(self) -> Comm:
        return self.comm

    def event(self, event: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(event)


def as_sync_group(group: Comm | SyncGroup) -> SyncGroup:
    """A SyncGroup as given, or a StaticGroup around a plain Comm."""
    return group if isinstance(group, SyncGroup) else StaticGroup(group)


__all__ = ["SyncGroup", "StaticGroup", "as_sync_group", "EventSink"]
