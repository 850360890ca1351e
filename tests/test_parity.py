"""Bit-parity of the shared state: digest vote, repair from the majority, bytes on the wire."""

import torch

from lowband.algorithms import DiLoCo
from lowband.comm import Comm
from lowband.fault import check_parity, shared_state_of, state_digest
from lowband.fault.parity import majority
from lowband.models import ModelConfig, build_model
from lowband.testing import run_ranks

DIGEST_ROW = 3 * 8  # (state digest, layout digest, nbytes) as int64


def make_state(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(7, 5, generator=g),
        torch.randn(13, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g).to(torch.bfloat16),
        torch.tensor([42], dtype=torch.int64),
    ]


def flip_bit(t: torch.Tensor, index: int, bit: int) -> None:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    t.view(-1).view(ints)[index] ^= 1 << bit


def bits(tensors) -> list[bytes]:
    return [t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors]


def test_majority_vote_and_ties():
    assert majority([5, 5, 5]) == (5, 0)
    assert majority([7, 5, 5]) == (5, 1)
    assert majority([1, 2, 2, 1]) == (1, 0)  # 2-2 tie: the lowest rank holding a tied digest
    assert majority([3, 1, 2, 2, 1]) == (1, 1)
    assert majority([9, 8, 7]) == (9, 0)  # no majority at all: rank 0


def test_identical_state_costs_only_the_digests():
    def fn(comm: Comm):
        state = make_state()
        before = bits(state)
        report = check_parity(comm, state, step=10)
        assert bits(state) == before
        return report, comm.stats.by_op()

    n = 3
    for report, by_op in run_ranks(n, fn):
        assert report.ok and report.event is None and report.votes == n
        assert report.digest == state_digest(make_state())
        assert set(by_op) == {"all_gather"}
        assert by_op["all_gather"]["bytes_sent"] == (n - 1) * DIGEST_ROW
        assert by_op["all_gather"]["bytes_recv"] == (n - 1) * DIGEST_ROW


def test_one_flipped_bit_is_detected_and_repaired():
    good = bits(make_state())
    nbytes = sum(len(b) for b in good)

    def fn(comm: Comm):
        state = make_state()
        if comm.rank == 2:
            flip_bit(state[0], index=17, bit=3)
        report = check_parity(comm, state, step=7)
        return report, bits(state), comm.stats.by_op()

    results = run_ranks(4, fn)
    for rank, (report, state_bits, _) in enumerate(results):
        assert state_bits == good  # bit-identical everywhere after the repair
        assert report.event == {
            "event": "parity_mismatch",
            "step": 7,
            "ranks": [2],
            "repaired_from": 0,
            "votes": 3,
        }
        assert report.repaired == (rank == 2)
    assert results[0][2]["send"]["bytes_sent"] == nbytes  # one copy, to rank 2 only
    assert results[2][2]["recv"]["bytes_recv"] == nbytes
    assert "send" not in results[1][2] and "recv" not in results[1][2]
    assert "recv" not in results[3][2]


def test_two_corrupted_among_five_repaired_from_majority():
    good = bits(make_state())

    def fn(comm: Comm):
        state = make_state()
        if comm.rank == 0:
            flip_bit(state[1], index=4, bit=60)
        if comm.rank == 3:
            flip_bit(state[2], index=0, bit=0)
            state[3] += 1  # and a wrong step counter
        report = check_parity(comm, state, step=3)
        return report, bits(state)

    for rank, (report, state_bits) in enumerate(run_ranks(5, fn)):
        assert state_bits == good
        assert report.mismatched == [0, 3]
        assert report.source == 1  # lowest rank of the majority; rank 0 is in the wrong
        assert report.votes == 3
        assert report.repaired == (rank in (0, 3))


def test_tie_is_broken_by_the_lowest_rank():
    a, b = bits(make_state(0)), bits(make_state(1))

    def fn(comm: Comm):
        state = make_state(0 if comm.rank in (1, 3) else 1)  # ranks 0, 2 hold b; 1, 3 hold a
        return check_parity(comm, state, step=1), bits(state)

    for report, state_bits in run_ranks(4, fn):
        assert state_bits == b != a
        assert report.mismatched == [1, 3] and report.source == 0 and report.votes == 2


def test_other_layout_is_reported_not_repaired():
    def fn(comm: Comm):
        state = make_state()
        if comm.rank == 1:
            state = [*state, torch.zeros(3)]
        report = check_parity(comm, state, step=2)
        return report

    reports = run_ranks(3, fn)
    assert all(r.mismatched == [1] and r.source == 0 for r in reports)
    assert not reports[1].repaired


def test_single_worker_is_trivially_in_parity():
    report = check_parity(Comm(None), make_state(), step=0)
    assert report.ok and report.votes == 1


CFG = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32)


def test_diloco_shared_state_repair_then_training_stays_in_lockstep():
    """Corrupt one worker's global params, outer momentum and outer step counter after an outer
    step; parity repairs all three and the model, and the workers stay bit-identical after."""

    def train(algo, model, opt, rank, steps, start):
        for s in range(start, start + steps):
            g = torch.Generator().manual_seed(100 * s + rank)
            t = torch.randint(0, CFG.vocab_size, (2, 9), generator=g)
            model.loss(t[:, :-1], t[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
            algo.step()

    def fn(comm: Comm):
        model = build_model(CFG, seed=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        algo = DiLoCo(model, opt, comm, sync_every=2)
        train(algo, model, opt, comm.rank, 4, 0)  # two outer steps: momentum exists
        state = shared_state_of(algo)
        if comm.rank == 1:
            flip_bit(algo.global_params[0][0], index=0, bit=30)
            buf = algo.outer_opt.state[algo.global_params[0][1]]["momentum_buffer"]
            flip_bit(buf, index=2, bit=12)
            algo.outer_steps += 5
            next(model.parameters()).data.add_(1.0)
        report = check_parity(comm, state, step=4)
        assert algo.outer_steps == 2
        for g, p in zip(algo.global_params[0], model.parameters()):
            assert torch.equal(g, p.float())
        train(algo, model, opt, comm.rank, 2, 4)
        return report, state_digest(state.shared_state())

    results = run_ranks(3, fn)
    assert [r.repaired for r, _ in results] == [False, True, False]
    assert all(r.mismatched == [1] for r, _ in results)
    assert len({d for _, d in results}) == 1
