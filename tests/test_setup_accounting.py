"""Start-up waits are kept out of exposed communication time (issue #19, point 5).

An algorithm's constructor all-gathers a digest of the starting weights (ensure_same_start), which
waits for the slowest worker to get there. That wait is counted as start-up time
(`CommStats.setup_seconds`), not in `CommStats.seconds`, the exposed communication the loop
subtracts from compute; its bytes are counted as usual.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import lowband
from lowband.comm import CommStats
from lowband.comm.accounting import Traffic
from lowband.models import ModelConfig, build_model
from lowband.testing import run_ranks
from lowband.zo import ZOTrainer

CFG = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32)
LATE = 1.0  # seconds rank 1 spends before it constructs its algorithm


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_setup_time_is_counted_apart_and_bytes_as_usual():
    stats = CommStats()
    traffic = Traffic(sent=8, recv=8, critical_bytes=8, rounds=1)
    with stats.setup():
        stats.add("all_gather", traffic, seconds=2.0)
        other = threading.Thread(target=stats.add, args=("all_gather",), kwargs={"seconds": 0.5})
        other.start()  # another thread (a background reduction) is not in this thread's setup
        other.join()
    stats.add("all_gather", seconds=0.25)
    assert stats.bytes_sent == 8 and stats.bytes_recv == 8
    assert stats.setup_seconds == 2.0 and stats.seconds == 0.75
    again = CommStats()
    again.load_state_dict(stats.state_dict())  # a checkpoint keeps it
    assert again.setup_seconds == 2.0 and again.by_op() == stats.by_op()


def _build(name: str, model, comm):
    if name == "zo":
        return ZOTrainer(model, comm, lr=1e-2, eps=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return lowband.DiLoCo(model, opt, comm, sync_every=2)


@pytest.mark.parametrize("name", ["diloco", "zo"])
def test_a_late_rank_does_not_add_its_delay_to_the_others_exposed_comm(name):
    def body(comm):
        model = build_model(CFG, seed=0)
        if comm.rank == 1:
            time.sleep(LATE)
        t0 = time.perf_counter()
        _build(name, model, comm)
        waited = time.perf_counter() - t0
        s = comm.stats
        return waited, s.seconds, s.setup_seconds, s.bytes_sent

    (waited, exposed, setup, sent), (_, exposed1, _, sent1) = run_ranks(2, body)
    assert waited > 0.8 * LATE  # rank 0 did wait for rank 1 in its constructor...
    assert setup > 0.8 * LATE  # ...and that wait is start-up time,
    assert exposed < 0.3 * LATE and exposed1 < 0.3 * LATE  # not exposed communication
    assert sent == sent1 == 8  # the digest's bytes are counted: one int64 to the one peer
