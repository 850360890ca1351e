"""Every algorithm through a sync group whose rounds fail on cue (lowband.testing.FakeGroup).

No processes: 3 ranks as threads over Gloo. A reduction fails on one rank at one round, a commit
vote fails on another: every rank must roll the same rounds back, apply each committed round
exactly once, and keep the state it shares bit-identical. Without faults the elastic-style group
must give the static group's result bit for bit (one code path).
"""

from __future__ import annotations

import pytest
import torch
from outer_helpers import batch, flat, make, one_intra_op_thread  # noqa: F401

from lowband.algorithms import CO2, DDP, DiLoCo, NoLoCo, StreamingDiLoCo
from lowband.comm.sync import StaticGroup
from lowband.testing import FakeGroup, run_ranks

H = 4
ROUNDS = 6
ALGOS = {
    "ddp": (lambda m, o, g: DDP(m, o, g), 1),
    "diloco": (lambda m, o, g: DiLoCo(m, o, g, sync_every=H), H),
    "streaming-tau0": (
        lambda m, o, g: StreamingDiLoCo(m, o, g, sync_every=2 * H, fragments=2, overlap=0, bits=32),
        H,
    ),
    "streaming-tau1": (
        lambda m, o, g: StreamingDiLoCo(m, o, g, sync_every=2 * H, fragments=2, overlap=1, bits=32),
        H,
    ),
    "noloco": (lambda m, o, g: NoLoCo(m, o, g, sync_every=H, group_size=3), H),
    "co2-delay0": (lambda m, o, g: CO2(m, o, g, sync_every=H, co2_delay=0), H),
    "co2-delay1": (lambda m, o, g: CO2(m, o, g, sync_every=H, co2_delay=1), H),
}


def _train(comm, name, group_of):
    make_algo, every = ALGOS[name]
    model, opt = make()
    group = group_of(comm)
    algo = make_algo(model, opt, group)
    for step in range(every * ROUNDS):
        x, y = batch(comm.rank, step)
        model.loss(x, y).backward()
        algo.sync_gradients()
        opt.step()
        opt.zero_grad()
        algo.step()
    algo.close()
    return flat(model), algo, group


@pytest.mark.parametrize("name", list(ALGOS))
def test_without_faults_the_elastic_path_is_the_static_path(name):
    static = run_ranks(3, lambda c: _train(c, name, StaticGroup)[0])
    fake = run_ranks(3, lambda c: _train(c, name, FakeGroup)[0])
    for s, f in zip(static, fake):
        assert torch.equal(s, f)


@pytest.mark.parametrize("name", list(ALGOS))
def test_failed_rounds_roll_back_everywhere_and_nothing_is_applied_twice(name):
    # rank 1 loses round 2's reduction; rank 2 votes no at round 4
    faults = {1: dict(fail_reduce={2}), 2: dict(fail_commit={4})}

    def body(comm):
        _, algo, group = _train(comm, name, lambda c: FakeGroup(c, **faults.get(c.rank, {})))
        return algo, group

    results = run_ranks(3, body)
    votes = [g.votes for _, g in results]
    assert votes[0] == votes[1] == votes[2], "a round committed on some ranks only"
    failed = [r for r, ok in votes[0] if not ok]
    assert failed == [2, 4], votes[0]
    committed = sum(ok for _, ok in votes[0])
    for algo, group in results:
        if name == "noloco":  # replicas differ by design: a partial round is still applied
            assert algo.outer_steps == ROUNDS
            continue
        assert len(group.discards) == 2
        if name == "ddp":
            continue
        applied = algo.outer_steps
        if name == "co2-delay1":  # round r applies round r-1's average: a failed landing skips one
            assert [a for _, a in algo.applied].count(None) == 1 + 2
        else:
            assert applied == committed, (applied, committed)  # each commit applied exactly once
    if name == "noloco":
        return
    # the shared state is bit-identical across ranks after every committed round
    digests = [g.digests for _, g in results]
    assert digests[0] and digests[0] == digests[1] == digests[2]


def test_a_failed_diloco_round_leaves_the_last_global_parameters():
    def body(comm):
        model, opt = make()
        group = FakeGroup(comm, fail_commit={2} if comm.rank == 0 else set())
        algo = DiLoCo(model, opt, group, sync_every=H)
        for step in range(2 * H):
            x, y = batch(comm.rank, step)
            model.loss(x, y).backward()
            opt.step()
            opt.zero_grad()
            if step == H:
                after_round_1 = [g.clone() for g in algo.global_params[0]]
            algo.step()
        # round 2 failed: the model is back at round 1's global parameters, which did not move
        for g, saved, p in zip(algo.global_params[0], after_round_1, algo.fragments[0]):
            assert torch.equal(g, saved) and torch.equal(p.detach(), saved)
        return flat(model)

    a, b, c = run_ranks(3, body)
    assert torch.equal(a, b) and torch.equal(b, c)
