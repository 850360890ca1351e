"""C4-style failure and slowness detection: collective timings, robust z-scores, link probes, a watchdog.

C4 (Dong et al. 2024, Alibaba) localises faults in collective training from per-rank collective
timings. lowband keeps three small pieces of it:

Slow rank. Each rank records, per collective call, (op, entry time, duration): how long it was
blocked in the call (`Detector.record`, or `with detector.timed(op):`, or a Comm hook). A
collective cannot finish before its last rank enters, so everybody waits for the last one and the
last one barely waits at all: a rank that is persistently last (slow compute, a throttled GPU, a
busy host) shows up as the rank with the SHORTEST waits, by roughly the time the others spend
waiting for it. Entry times would say the same but are on unsynchronised clocks across hosts;
durations are local and need no clock sync. `Detector.exchange()` all-gathers one small vector per
rank (median and mean wait over the last `window` calls, the call count) and computes robust
z-scores of the medians,

    z_r = (median_k w_k - w_r) / (1.4826 * max(MAD, abs_floor, rel_floor * median))

(MAD = median |w_k - median|; 1.4826 makes it a standard deviation for Gaussian noise; the floor
keeps z finite when all but one rank agree exactly and sets the smallest gap worth flagging). A
rank with z > threshold (3.5, Iglewicz and Hoaglin's cut-off) is flagged: its median over the
window being low means it was last in more than half of the window's calls, i.e. persistently.
Needs at least 3 ranks: with 2, each is the other's only reference.

Slow link. `probe_links(comm, nbytes)` times a ping-pong (nbytes there, 1 byte back) for every
ordered pair (src, dst) and all-gathers the rows into an n x n matrix of seconds (src x dst). The
schedule is fixed and the same on every rank: a round-robin tournament (circle method), n - 1
rounds (n if n is odd, one rank sitting out each round) of disjoint pairs; in its pair (a < b)
a probes a -> b, then b probes b -> a. Each rank is in at most one pair per round, so its uplink
carries one probe at a time, and the whole matrix takes (n - 1) * 2 * repeats round trips, not
n(n - 1) * repeats. Deadlock freedom: within a round the pairs are disjoint and both members issue
the same sends and receives in the same order; a rank moves to round k + 1 only after its round-k
partner has answered, and its round-(k + 1) partner does the same, so by induction on k every
round completes. `LinkMatrix.analyze()` flags a row outlier (a slow uplink of src: every link out
of it is slow), a column outlier (a slow downlink of dst), and single cells not explained by a
flagged row or column (one slow path), by the same robust z.

Hangs. `with detector.watch(timeout_s, op):` starts a timer thread; if the block is still running
when it fires, a "hang" event is recorded at once (so it reaches the metrics even if the call
never returns) and `CollectiveTimeout` is raised when the block ends. The watchdog cannot abort a
blocked Gloo or NCCL call by itself (Python cannot interrupt a thread inside C++); what unblocks
the call is the process group's own timeout, which raises in the caller, and the watchdog then
re-raises it as CollectiveTimeout. So give the group a timeout too, longer than the watchdog's:

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=60))  # lowband.testing
    work.wait(datetime.timedelta(seconds=60))                                  # per call, Gloo

Events (dicts, for the metrics file and the report):
    {"event": "slow_rank", "rank", "z", "window", "wait_s", "median_wait_s"}
    {"event": "slow_link", "src", "dst", "z", "seconds"}   src or dst None: every link out of
                                                           src (uplink) / into dst (downlink)
    {"event": "hang", "op", "seconds", "rank"}
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lowband.comm import Comm
from lowband.errors import LowbandError

log = logging.getLogger("lowband.fault")

PROBE_TAG = 0x9B0E
"""P2p tag of the link probes (the ack uses PROBE_TAG + 1)."""

EventSink = Callable[[dict[str, Any]], None]


class CollectiveTimeout(LowbandError):
    """A blocking collective ran past its watchdog timeout (a peer hung, died or is unreachable)."""


def robust_z(
    values: Sequence[float], *, abs_floor: float = 0.0, rel_floor: float = 0.0
) -> list[float]:
    """(v - median) / (1.4826 * max(MAD, abs_floor, rel_floor * |median|)) for each value."""
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    scale = 1.4826 * max(mad, abs_floor, rel_floor * abs(med), 1e-12)
    return [(v - med) / scale for v in values]


@dataclass(frozen=True)
class CollectiveRecord:
    op: str
    t_enter: float
    """time.perf_counter() when the call was entered (this process's clock)."""
    seconds: float
    """How long the caller was blocked in it."""


@dataclass
class SlowRankReport:
    """One detection window, identical on every rank."""

    window: int
    """Index of this window (0, 1, ...): how many exchanges came before."""
    median_wait_s: list[float]
    mean_wait_s: list[float]
    calls: list[int]
    z: list[float]
    """Robust z of each rank's median wait, sign flipped: high = waits least = slowest."""
    flagged: list[int]
    events: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def watch(
    timeout_s: float,
    op: str = "collective",
    *,
    rank: int = 0,
    on_event: EventSink | None = None,
) -> Iterator[None]:
    """Raise CollectiveTimeout at the end of the block if it ran past timeout_s (module docstring).

    The "hang" event goes to `on_event` from the timer thread at the moment the timeout expires.
    """
    fired = threading.Event()
    t0 = time.perf_counter()

    def expire() -> None:
        fired.set()
        event = {"event": "hang", "op": op, "seconds": timeout_s, "rank": rank}
        log.error("rank %d: %s blocked for more than %.3gs", rank, op, timeout_s)
        if on_event is not None:
            on_event(event)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as e:
        timer.cancel()
        if fired.is_set():
            raise CollectiveTimeout(
                f"{op} on rank {rank} failed after {time.perf_counter() - t0:.1f}s, past its "
                f"{timeout_s:g}s watchdog timeout: a peer hung, died or is unreachable ({e})"
            ) from e
        raise
    timer.cancel()
    if fired.is_set():
        raise CollectiveTimeout(
            f"{op} on rank {rank} blocked for {time.perf_counter() - t0:.1f}s, past its "
            f"{timeout_s:g}s watchdog timeout"
        )


class Detector:
    """Per-rank collective timings, exchanged every so often to flag a persistently slow rank.

    record()/timed() are cheap and thread-safe (a background reducer may record too). exchange()
    is a collective: every rank must call it at the same point of the loop (e.g. every N steps),
    never from inside another collective or from a background thread.
    """

    def __init__(
        self,
        comm: Comm,
        *,
        window: int = 32,
        threshold: float = 3.5,
        abs_floor_s: float = 0.002,
        rel_floor: float = 0.05,
        on_event: EventSink | None = None,
    ) -> None:
        self.comm = comm
        self.window = window
        """How many of the most recent calls an exchange looks at (a sliding window)."""
        self.threshold = threshold
        self.abs_floor_s = abs_floor_s
        """MAD floor in seconds: with the default 3.5 threshold, a rank must be ~10 ms last."""
        self.rel_floor = rel_floor
        """MAD floor as a fraction of the median wait (waits on a slow link are long and noisy)."""
        self.on_event = on_event
        self.records: deque[CollectiveRecord] = deque(maxlen=window)
        self.events: list[dict[str, Any]] = []
        self.windows = 0
        self.hung = False
        """Set when a watched call ran past its timeout."""
        self._lock = threading.Lock()
        self._own = threading.local()

    # -- recording ------------------------------------------------------------------------------
    def record(self, op: str, t_enter: float, seconds: float, *_: Any) -> None:
        """One collective call on this rank. Also the Comm hook signature (op, t_enter, seconds, ...)."""
        if getattr(self._own, "on", False):
            return  # the detector's own all-gather is not a sample
        with self._lock:
            self.records.append(CollectiveRecord(op, t_enter, seconds))

    @contextlib.contextmanager
    def timed(self, op: str) -> Iterator[None]:
        """Record the block as one call of `op` (for blocking calls outside a hooked Comm)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(op, t0, time.perf_counter() - t0)

    def emit(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def watch(self, timeout_s: float, op: str = "collective"):
        """`watch(...)` with this rank and this detector's event sink; a hang also sets `hung`."""

        def on_hang(event: dict[str, Any]) -> None:
            self.hung = True  # the caller (e.g. the membership layer) can drop out of the quorum
            self.emit(event)

        return watch(timeout_s, op, rank=self.comm.rank, on_event=on_hang)

    # -- detection ------------------------------------------------------------------------------
    def probe(self, nbytes: int = 1 << 16, **kwargs: Any) -> LinkMatrix:
        """`probe_links` on this group (a collective); its slow_link events go to this sink."""
        self._own.on = True  # probe traffic is not a collective sample
        try:
            matrix = probe_links(self.comm, nbytes, **kwargs)
        finally:
            self._own.on = False
        for event in matrix.analyze(threshold=self.threshold):
            self.emit(event)
        return matrix

    def exchange(self) -> SlowRankReport:
        """All-gather each rank's wait statistics and flag persistently slow ranks (a collective)."""
        with self._lock:
            waits = [r.seconds for r in self.records]
        n = self.comm.size
        mine = torch.tensor(
            [
                statistics.median(waits) if waits else math.nan,
                statistics.fmean(waits) if waits else math.nan,
                len(waits),
            ],
            dtype=torch.float64,
            device=self.comm.device,
        )
        rows = [torch.empty_like(mine) for _ in range(n)]
        self._own.on = True
        try:
            self.comm.all_gather(rows, mine)
        finally:
            self._own.on = False
        table = torch.stack(rows).cpu().tolist()
        medians = [row[0] for row in table]
        report = SlowRankReport(
            window=self.windows,
            median_wait_s=medians,
            mean_wait_s=[row[1] for row in table],
            calls=[int(row[2]) for row in table],
            z=[0.0] * n,
            flagged=[],
        )
        self.windows += 1
        if n < 3 or any(math.isnan(m) for m in medians):
            return report  # no robust reference (module docstring)
        report.z = [
            -z for z in robust_z(medians, abs_floor=self.abs_floor_s, rel_floor=self.rel_floor)
        ]
        center = statistics.median(medians)
        for r, z in enumerate(report.z):
            if z > self.threshold:
                report.flagged.append(r)
                event = {
                    "event": "slow_rank",
                    "rank": r,
                    "z": round(z, 2),
                    "window": report.window,
                    "wait_s": medians[r],
                    "median_wait_s": center,
                }
                report.events.append(event)
                self.emit(event)
                if self.comm.rank == 0:
                    log.warning(
                        "rank %d is persistently last in collectives (z = %.1f over %d calls): "
                        "slow compute or host",
                        r,
                        z,
                        report.calls[r],
                    )
        return report


# -- link probes --------------------------------------------------------------------------------
@dataclass
class LinkMatrix:
    """Ping-pong times of every ordered pair: seconds[src][dst] (diagonal NaN)."""

    nbytes: int
    seconds: list[list[float]]

    @property
    def bandwidth_Bps(self) -> list[list[float]]:
        """Effective bytes per second of each src -> dst probe (latency included)."""
        return [[self.nbytes / s if s > 0 else math.nan for s in row] for row in self.seconds]

    def analyze(
        self, *, threshold: float = 3.5, abs_floor_s: float = 0.003, rel_floor: float = 0.1
    ) -> list[dict[str, Any]]:
        """slow_link events for row (uplink), column (downlink) and single-cell outliers."""
        n = len(self.seconds)
        if n < 3:
            return []
        floors = {"abs_floor": abs_floor_s, "rel_floor": rel_floor}
        off = [[self.seconds[i][j] for j in range(n) if j != i] for i in range(n)]
        cols = [[self.seconds[i][j] for i in range(n) if i != j] for j in range(n)]
        row_z = robust_z([statistics.median(r) for r in off], **floors)
        col_z = robust_z([statistics.median(c) for c in cols], **floors)
        cells = [(i, j) for i in range(n) for j in range(n) if i != j]
        cell_z = robust_z([self.seconds[i][j] for i, j in cells], **floors)
        events = []
        slow_rows = {i for i in range(n) if row_z[i] > threshold}
        slow_cols = {j for j in range(n) if col_z[j] > threshold}
        for i in sorted(slow_rows):
            events.append(
                {
                    "event": "slow_link",
                    "src": i,
                    "dst": None,
                    "z": round(row_z[i], 2),
                    "seconds": statistics.median(off[i]),
                }
            )
        for j in sorted(slow_cols):
            events.append(
                {
                    "event": "slow_link",
                    "src": None,
                    "dst": j,
                    "z": round(col_z[j], 2),
                    "seconds": statistics.median(cols[j]),
                }
            )
        for (i, j), z in zip(cells, cell_z):
            if z > threshold and i not in slow_rows and j not in slow_cols:
                events.append(
                    {
                        "event": "slow_link",
                        "src": i,
                        "dst": j,
                        "z": round(z, 2),
                        "seconds": self.seconds[i][j],
                    }
                )
        return events


def tournament_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs (a < b) covering every pair once: the circle method."""
    m = n + n % 2  # an odd n gets a phantom rank m - 1: its partner sits the round out
    rounds = []
    for r in range(m - 1):
        rot = [(k + r) % (m - 1) for k in range(m - 1)]
        pairs = [(rot[0], m - 1)] + [(rot[k], rot[-k]) for k in range(1, m // 2)]
        rounds.append(sorted((min(p), max(p)) for p in pairs if max(p) < n))
    return rounds


def probe_links(
    comm: Comm,
    nbytes: int = 1 << 16,
    *,
    repeats: int = 5,
    delay: Callable[[int, int], float] | None = None,
) -> LinkMatrix:
    """Time a ping-pong over every ordered pair (module docstring); a collective of all ranks.

    Each pair runs `repeats` times and keeps the fastest (noise only ever adds time). The bytes go
    through `comm` and are counted as send/recv. `delay(src, dst)` seconds are slept by src before
    each send: failure injection for tests (a slow uplink, a slow path).
    """
    n, me = comm.size, comm.rank
    row = [math.nan] * n
    payload = torch.zeros(max(1, nbytes), dtype=torch.uint8, device=comm.device)
    ack = torch.zeros(1, dtype=torch.uint8, device=comm.device)

    def ping(src: int, dst: int) -> None:  # both ranks of the pair run this, in the same order
        best = math.inf
        for _ in range(repeats):
            if me == src:
                t0 = time.perf_counter()
                if delay is not None and (d := delay(src, dst)) > 0:
                    time.sleep(d)
                comm.send(payload, dst, tag=PROBE_TAG)
                comm.recv(ack, dst, tag=PROBE_TAG + 1)
                best = min(best, time.perf_counter() - t0)
            else:
                comm.recv(payload, src, tag=PROBE_TAG)
                comm.send(ack, src, tag=PROBE_TAG + 1)
        if me == src:
            row[dst] = best

    for pairs in tournament_rounds(n):
        for a, b in pairs:
            if me in (a, b):
                ping(a, b)
                ping(b, a)
    mine = torch.tensor(row, dtype=torch.float64, device=comm.device)
    rows = [torch.empty_like(mine) for _ in range(n)]
    comm.all_gather(rows, mine)
    return LinkMatrix(nbytes=nbytes, seconds=torch.stack(rows).cpu().tolist())
