"""NoLoCo in an elastic group: a partner that dies or hangs mid-exchange does not hang its group."""

from __future__ import annotations

import time

import torch
from torch import nn

from lowband.algorithms import NoLoCo
from lowband.comm.sync import SyncGroup
from lowband.testing import run_ranks


class _Group(SyncGroup):
    """An elastic-like group that only records the errors reported to it."""

    elastic = True

    def __init__(self, comm) -> None:
        self.comm = comm
        self.errors: list[BaseException] = []

    def report(self, error: BaseException) -> None:
        self.errors.append(error)


def _worker(comm, silent: int):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    group = _Group(comm)
    algo = NoLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), group, group_size=4)
    with torch.no_grad():  # after the common start: worker r holds all (r + 1)
        for p in model.parameters():
            p.fill_(float(comm.rank + 1))
    if comm.rank == silent:
        return None  # died before the exchange: never sends nor receives
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    t0 = time.perf_counter()
    mean, lost = algo._group_mean(theta, [0, 1, 2, 3], tag=7)
    return mean, lost, time.perf_counter() - t0, group.errors


def test_a_dead_partner_falls_back_to_the_partners_that_answered():
    timeout = 3.0
    results = run_ranks(4, _worker, 3, timeout_s=timeout)
    for rank in range(3):
        mean, lost, seconds, errors = results[rank]
        assert lost == [3], lost
        # the mean of the workers that answered: (1 + 2 + 3) / 3, exactly
        assert torch.equal(mean, torch.full_like(mean, 2.0))
        assert errors, "the failed transfer was not reported"
        assert seconds < 4 * timeout, f"rank {rank} waited {seconds:.1f}s"


def test_without_failures_it_is_noloco_s_group_mean():
    results = run_ranks(4, _worker, -1, timeout_s=10.0)
    for mean, lost, _, errors in results:
        assert lost == [] and errors == []
        assert torch.equal(mean, torch.full_like(mean, 2.5))
