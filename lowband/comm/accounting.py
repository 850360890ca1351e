"""Exact byte accounting: what each worker sends and receives under a collective's algorithm.

lowband runs the backend's own collective (Gloo on CPU, NCCL on GPU) and accounts for it as the
bandwidth-optimal algorithm named below, which is what NCCL runs for large tensors:

    all_reduce      ring: a reduce-scatter then an all-gather, 2(n-1) steps. The tensor is cut
                    into n chunks (as torch.tensor_split cuts numel); in step k rank r sends chunk
                    (r-k) mod n, then chunk (r+1-k) mod n. So rank r sends every chunk except
                    (r+1) mod n in the first phase and every chunk except (r+2) mod n in the
                    second: 2(n-1)/n of the tensor when n divides it.
    reduce_scatter  ring, first phase of the above.
    all_gather      ring, n-1 steps: each rank forwards every chunk but the one its successor owns.
    broadcast       pipelined chain from the root: every rank but the last forwards the tensor once.
    all_to_all      direct: each rank sends the n-1 chunks meant for others and receives n-1.
    send / recv     the tensor, once.

`critical_bytes` is what the busiest uplink carries and `rounds` the sequential latency hops; the
link model turns them into seconds (lowband.comm.link).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Traffic:
    """What one rank puts on and takes off the wire for one operation."""

    sent: int
    recv: int
    critical_bytes: int
    """Bytes through the busiest uplink: sets the bandwidth term of the emulated time."""
    rounds: int
    """Sequential latency hops."""


def chunk_sizes(numel: int, n: int) -> list[int]:
    """Element counts of n chunks, as torch.tensor_split cuts numel (the first numel % n get one more)."""
    base, extra = divmod(numel, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def all_reduce_traffic(numel: int, itemsize: int, rank: int, n: int) -> Traffic:
    if n == 1:
        return Traffic(0, 0, 0, 0)
    c = chunk_sizes(numel, n)
    total = numel
    sent = (2 * total - c[(rank + 1) % n] - c[(rank + 2) % n]) * itemsize
    prev = (rank - 1) % n
    recv = (2 * total - c[(prev + 1) % n] - c[(prev + 2) % n]) * itemsize
    critical = max((2 * total - c[(r + 1) % n] - c[(r + 2) % n]) for r in range(n)) * itemsize
    return Traffic(sent, recv, critical, 2 * (n - 1))


def reduce_scatter_traffic(numel: int, itemsize: int, rank: int, n: int) -> Traffic:
    if n == 1:
        return Traffic(0, 0, 0, 0)
    c = chunk_sizes(numel, n)
    sent = (numel - c[(rank + 1) % n]) * itemsize
    recv = (numel - c[rank % n]) * itemsize
    critical = max(numel - c[(r + 1) % n] for r in range(n)) * itemsize
    return Traffic(sent, recv, critical, n - 1)


def all_gather_traffic(chunk_numel: int, itemsize: int, rank: int, n: int) -> Traffic:
    """Every rank contributes `chunk_numel` elements and receives everybody else's."""
    if n == 1:
        return Traffic(0, 0, 0, 0)
    b = (n - 1) * chunk_numel * itemsize
    return Traffic(b, b, b, n - 1)


def broadcast_traffic(numel: int, itemsize: int, rank: int, src: int, n: int) -> Traffic:
    if n == 1:
        return Traffic(0, 0, 0, 0)
    nbytes = numel * itemsize
    position = (rank - src) % n  # place in the chain src -> src+1 -> ... -> src-1
    sent = nbytes if position < n - 1 else 0
    recv = nbytes if position > 0 else 0
    return Traffic(sent, recv, nbytes, n - 1)


def all_to_all_traffic(numel: int, itemsize: int, rank: int, n: int) -> Traffic:
    """Equal splits: numel is this rank's whole input (n chunks, one per destination)."""
    if n == 1:
        return Traffic(0, 0, 0, 0)
    c = chunk_sizes(numel, n)
    b = (numel - c[rank]) * itemsize
    return Traffic(b, b, max(numel - x for x in c) * itemsize, 1)


def p2p_traffic(numel: int, itemsize: int, sending: bool) -> Traffic:
    nbytes = numel * itemsize
    return Traffic(nbytes if sending else 0, 0 if sending else nbytes, nbytes, 1)


@dataclass
class OpStats:
    calls: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    seconds: float = 0.0
    """Time the caller was blocked in this operation (issue plus wait): exposed communication."""
    background_seconds: float = 0.0
    """Time spent in this operation by a background thread while training went on (overlapped)."""
    setup_seconds: float = 0.0
    """Time the caller was blocked in it during start-up (`CommStats.setup()`): mostly waiting for
    the slowest worker to arrive, which is not a cost of the algorithm's communication."""


@dataclass
class CommStats:
    """Counters of one worker, per operation name, since the stats were created.

    Every byte is counted. Seconds are counted in one of three places: `seconds` (exposed: the
    caller was blocked), `background_seconds` (overlapped with training) or `setup_seconds`
    (operations inside `with stats.setup():`, such as an algorithm's start-up check).
    """

    ops: dict[str, OpStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # a background thread may count while the loop counts
        self._local = threading.local()  # whether this thread is inside setup()

    @contextlib.contextmanager
    def setup(self) -> Iterator[None]:
        """Count this thread's blocked time as start-up time, not as exposed communication.

        An algorithm's constructor waits for the slowest worker to reach it (processes start
        seconds apart); counted as exposed communication, that wait would dwarf a short run's
        real communication time. Bytes are counted as usual.
        """
        outer = getattr(self._local, "setup", False)
        self._local.setup = True
        try:
            yield
        finally:
            self._local.setup = outer

    def add(
        self,
        op: str,
        traffic: Traffic | None = None,
        seconds: float = 0.0,
        background: bool = False,
    ) -> None:
        with self._lock:
            s = self.ops.setdefault(op, OpStats())
            if traffic is not None:
                s.calls += 1
                s.bytes_sent += traffic.sent
                s.bytes_recv += traffic.recv
            if background:
                s.background_seconds += seconds
            elif getattr(self._local, "setup", False):
                s.setup_seconds += seconds
            else:
                s.seconds += seconds

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.ops.values())

    @property
    def bytes_recv(self) -> int:
        return sum(s.bytes_recv for s in self.ops.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.ops.values())

    @property
    def background_seconds(self) -> float:
        return sum(s.background_seconds for s in self.ops.values())

    @property
    def setup_seconds(self) -> float:
        return sum(s.setup_seconds for s in self.ops.values())

    def by_op(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                k: {
                    "calls": v.calls,
                    "bytes_sent": v.bytes_sent,
                    "bytes_recv": v.bytes_recv,
                    "seconds": v.seconds,
                    "background_seconds": v.background_seconds,
                    "setup_seconds": v.setup_seconds,
                }
                for k, v in sorted(self.ops.items())
            }

    def reset(self) -> None:
        """Start counting afresh (e.g. after a warm-up, or after an algorithm's start-up check)."""
        with self._lock:
            self.ops = {}

    def state_dict(self) -> dict:
        return {"ops": self.by_op()}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self.ops = {
                k: OpStats(
                    int(v["calls"]),
                    int(v["bytes_sent"]),
                    int(v["bytes_recv"]),
                    float(v["seconds"]),
                    float(v.get("background_seconds", 0.0)),
                    float(v.get("setup_seconds", 0.0)),
                )
                for k, v in state["ops"].items()
            }


_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def format_bytes(n: float | None) -> str:
    """Bytes for people: '60 B', '1.23 KB', '45.6 MB' (decimal units, 1 KB = 1000 B, as link
    speeds are; 3 significant digits). Every byte figure lowband prints goes through here."""
    if n is None or not math.isfinite(n):
        return "–"
    if abs(n) < 999.5:
        return f"{n:.0f} B"
    for i, unit in enumerate(_BYTE_UNITS[1:], 1):
        value = n / 1000**i
        # Pick the first unit where the 3-digit rounding stays below 1000 (999.7 KB -> 1.00 MB).
        if abs(float(f"{value:.3g}")) < 1000 or unit == _BYTE_UNITS[-1]:
            return f"{value:#.3g}".rstrip(".") + f" {unit}"  # '#' keeps 1.00, 45.0
    raise AssertionError("unreachable")
