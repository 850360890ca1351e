"""C4-style detection: a slow rank from collective waits, a slow link from probes, the watchdog."""

import threading
import time
from collections import deque

import pytest
import torch

from lowband.comm import Comm
from lowband.fault import CollectiveTimeout, Detector, LinkMatrix, robust_z, watch
from lowband.fault.detector import tournament_rounds
from lowband.testing import gloo_groups, run_ranks

CALLS = 24
SLOW_S = 0.025  # the slow rank's extra compute before each collective


def test_robust_z():
    z = robust_z([1.0, 1.0, 1.1, 0.9, 5.0])
    assert z[4] > 20 and all(abs(v) < 1 for v in z[:4])
    # all but one identical: MAD is 0 and the floor keeps z finite
    z = robust_z([2.0, 2.0, 2.0, 0.0], abs_floor=0.1)
    assert z[:3] == [0.0, 0.0, 0.0] and z[3] == pytest.approx(-2.0 / (1.4826 * 0.1))


def collectives(comm: Comm, slow_rank: int | None):
    det = Detector(comm, window=CALLS)
    t = torch.ones(256)
    for _ in range(CALLS):
        if comm.rank == slow_rank:
            time.sleep(SLOW_S)
        with det.timed("all_reduce"):
            comm.all_reduce(t)
    return det.exchange(), det.events


def test_slow_rank_is_flagged():
    results = run_ranks(4, collectives, slow_rank=2)
    for report, events in results:
        assert report.flagged == [2], report
        assert report.z[2] > 3.5
        assert report.calls == [CALLS] * 4
        # the slow rank waits least: the others wait for it
        assert report.median_wait_s[2] < min(report.median_wait_s[r] for r in (0, 1, 3))
        assert [(e["event"], e["rank"], e["window"]) for e in events] == [("slow_rank", 2, 0)]
    print("slow rank z:", [round(z, 1) for z in results[0][0].z])


def test_clean_run_has_no_false_positive():
    results = run_ranks(4, collectives, slow_rank=None)
    for report, events in results:
        assert report.flagged == [] and events == [], report
    print("clean z:", [round(z, 1) for z in results[0][0].z])


def test_two_ranks_never_flag():
    for report, _ in run_ranks(2, collectives, slow_rank=1):
        assert report.flagged == []  # no robust reference with two ranks


def probe(comm: Comm, slow: tuple[int | None, int | None] | None):
    def delay(src: int, dst: int) -> float:
        if slow is None:
            return 0.0
        s, d = slow
        return 0.04 if (s is None or s == src) and (d is None or d == dst) else 0.0

    det = Detector(comm)
    m = det.probe(4096, repeats=5, delay=delay)
    assert det.records == deque() and det.events == m.analyze()
    return m, det.events


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_tournament_covers_every_pair_once(n):
    rounds = tournament_rounds(n)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == [(a, b) for a in range(n) for b in range(a + 1, n)]
    assert all(len({x for p in r for x in p}) == 2 * len(r) for r in rounds)  # disjoint
    assert len(rounds) == n - 1 + n % 2


def test_slow_uplink_row_is_flagged():
    results = run_ranks(4, probe, slow=(2, None))  # rank 2 sleeps whenever it sends
    m, events = results[0]
    same = lambda a, b: torch.equal(torch.tensor(a).nan_to_num(), torch.tensor(b).nan_to_num())
    assert all(same(r[0].seconds, m.seconds) for r in results)  # every rank holds the matrix
    assert [(e["event"], e["src"], e["dst"]) for e in events] == [("slow_link", 2, None)]
    assert events[0]["z"] > 3.5
    assert min(m.seconds[2][j] for j in (0, 1, 3)) >= 0.04
    print("slow uplink z:", events[0]["z"])


def test_single_slow_path_is_flagged():
    _, events = run_ranks(4, probe, slow=(1, 3))[0]
    assert [(e["src"], e["dst"]) for e in events] == [(1, 3)]
    print("slow path z:", events[0]["z"])


def test_clean_probe_has_no_false_positive():
    m, events = run_ranks(4, probe, slow=None)[0]
    assert events == []
    assert all(m.seconds[i][i] != m.seconds[i][i] for i in range(4))  # NaN diagonal
    assert m.bandwidth_Bps[0][1] > 0


def test_column_outlier_is_a_slow_downlink():
    m = LinkMatrix(nbytes=1, seconds=[[float("nan")] * 4 for _ in range(4)])
    for i in range(4):
        for j in range(4):
            if i != j:
                m.seconds[i][j] = 0.05 if j == 1 else 0.001
    assert [(e["src"], e["dst"]) for e in m.analyze()] == [(None, 1)]


def test_watchdog_fires_on_a_long_call():
    det = Detector(Comm(None))
    with pytest.raises(CollectiveTimeout, match="all_reduce on rank 0 blocked for"):
        with det.watch(0.05, op="all_reduce"):
            time.sleep(0.2)
    assert det.events == [{"event": "hang", "op": "all_reduce", "seconds": 0.05, "rank": 0}]
    assert det.hung
    with det.watch(1.0, op="all_reduce"):
        pass
    assert len(det.events) == 1


def test_watchdog_flags_a_real_hang_then_surfaces_the_gloo_timeout():
    """Rank 1 never joins: the watchdog records the hang at 0.2 s; Gloo's own 1 s timeout is what
    unblocks rank 0, and the watchdog turns its error into CollectiveTimeout."""
    make = gloo_groups(2, timeout_s=1.0, prefix="hang")
    seen: list[tuple[float, dict]] = []
    outcome: dict = {}
    done = threading.Event()

    def rank0():
        comm = Comm(make(0))
        t0 = time.perf_counter()
        try:
            with watch(0.2, "all_reduce", on_event=lambda e: seen.append((time.perf_counter(), e))):
                comm.all_reduce(torch.ones(4))
        except CollectiveTimeout as e:
            outcome["error"], outcome["t0"], outcome["t1"] = e, t0, time.perf_counter()
        done.set()

    def rank1():
        group = make(1)  # joins the group, never the all_reduce; kept open until rank 0 is done
        done.wait(10)
        del group

    threads = [threading.Thread(target=rank0), threading.Thread(target=rank1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert "error" in outcome, "the hung all_reduce did not surface"
    assert isinstance(outcome["error"].__cause__, RuntimeError)  # Gloo's timeout
    ((t_hang, event),) = seen
    assert event["event"] == "hang" and event["op"] == "all_reduce"
    assert 0.15 < t_hang - outcome["t0"] < outcome["t1"] - outcome["t0"]
