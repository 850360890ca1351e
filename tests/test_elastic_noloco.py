"""NoLoCo under --elastic: a partner that dies or hangs mid-exchange does not hang its group."""

from __future__ import annotations

import time

import torch
from torch import nn

from lowband.algorithms.elastic import ElasticNoLoCo
from lowband.testing import run_ranks


class _Membership:
    """The part of lowband.fault.elastic.Membership the exchange touches."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def report_error(self, e: BaseException) -> None:
        self.errors.append(e)


def _worker(comm, silent: int):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(comm.rank + 1))  # worker r holds all (r + 1)
    algo = ElasticNoLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), comm, group_size=4)
    algo.membership = _Membership()
    if comm.rank == silent:
        return None  # died before the exchange: never sends nor receives
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    t0 = time.perf_counter()
    mean, lost = algo._tolerant_group_mean(theta, [0, 1, 2, 3], tag=7)
    return mean, lost, time.perf_counter() - t0, algo.membership.errors


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
