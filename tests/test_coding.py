import itertools
import math

import pytest
import torch

from lowband.coding import (
    BurstyStragglerModel,
    Minitask,
    MultiplexedSGC,
    SelectiveRepeatSGC,
    StragglerInjector,
    coded_round,
    cyclic_mds,
    decode_coefficients,
    fractional_repetition,
    get_code,
)
from lowband.errors import ConfigError
from lowband.testing import run_ranks

f64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors only: one intra-op thread avoids OpenMP oversubscription on busy machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHAPES = [(4, 1), (6, 2), (8, 2), (5, 2), (6, 1), (9, 2), (10, 3), (3, 2), (5, 0)]


def codes_for(n, s):
    out = [cyclic_mds(n, s)]
    if n % (s + 1) == 0:
        out.append(fractional_repetition(n, s))
    return out


# -- encoders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, s", SHAPES)
def test_every_survivor_set_decodes_the_exact_gradient(n, s):
    """For every set of n - s survivors: a^T B_I = 1, and the decoded vector is sum_j g_j."""
    g = torch.randn(n, 33, dtype=f64, generator=torch.Generator().manual_seed(n * 10 + s))
    exact = g.sum(0)
    for code in codes_for(n, s):
        coded = {i: code.encode(i, {j: g[j] for j in code.parts(i)}) for i in range(n)}
        for stragglers in itertools.combinations(range(n), s):
            survivors = [i for i in range(n) if i not in stragglers]
            a = decode_coefficients(code.B, survivors)
            assert float((a @ code.B - 1).abs().max()) < 1e-9
            assert all(a[i] == 0 for i in stragglers)
            decoded = code.decode({i: coded[i] for i in survivors})
            assert float((decoded - exact).abs().max()) < 1e-9 * float(exact.abs().max()) + 1e-12


@pytest.mark.parametrize("n, s", SHAPES)
def test_assignment_has_s_plus_one_parts_per_worker_and_per_part(n, s):
    for code in codes_for(n, s):
        assert all(len(p) == s + 1 for p in code.assignment)
        counts = [sum(j in p for p in code.assignment) for j in range(n)]
        assert counts == [s + 1] * n
        for i in range(n):  # B is supported exactly on the assignment
            support = {int(j) for j in torch.nonzero(code.B[i]).flatten()}
            assert support == set(code.parts(i))
    if s:
        assert cyclic_mds(n, s).parts(n - 1) == tuple((n - 1 + k) % n for k in range(s + 1))


def test_fractional_repetition_takes_the_first_arrival_of_each_group():
    code = fractional_repetition(6, 2)
    assert code.groups == ((0, 1, 2), (3, 4, 5))
    a = code.decode_coefficients([4, 2, 1, 5])  # arrival order
    assert a.tolist() == [0, 0, 1, 0, 1, 0]
    g = torch.randn(6, 5)  # fp32: 0/1 coefficients, only one rounding per group sum
    coded = {i: code.encode(i, {j: g[j] for j in code.parts(i)}) for i in (4, 2)}
    torch.testing.assert_close(code.decode(coded), g.sum(0))
    with pytest.raises(ValueError, match="no worker of group"):
        code.decode_coefficients([0, 1, 2])


def test_cyclic_code_in_fp32_is_accurate_to_fp32():
    code = cyclic_mds(6, 2)
    g = torch.randn(6, 100)
    coded = {i: code.encode(i, {j: g[j] for j in code.parts(i)}) for i in (0, 2, 3, 5)}
    out = code.decode(coded)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, g.double().sum(0).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make, n, s, match",
    [
        (fractional_repetition, 5, 1, "s \\+ 1 to divide n"),
        (fractional_repetition, 8, 2, "s \\+ 1 to divide n"),
        (fractional_repetition, 4, 4, "0 <= s <= n - 1"),
        (cyclic_mds, 4, 4, "0 <= s <= n - 1"),
        (cyclic_mds, 4, -1, "0 <= s <= n - 1"),
        (cyclic_mds, 0, 0, "n >= 1"),
    ],
)
def test_impossible_codes_are_rejected(make, n, s, match):
    with pytest.raises(ConfigError, match=match):
        make(n, s)


def test_too_many_stragglers_and_registry():
    code = cyclic_mds(6, 2)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_coefficients(code.B, [0, 1, 2])  # 3 stragglers > s
    assert get_code("fr", 4, 1).name == "fractional_repetition"
    assert torch.equal(get_code("cyclic", 5, 2, seed=3).B, cyclic_mds(5, 2, seed=3).B)
    with pytest.raises(ConfigError, match="unknown gradient code"):
        get_code("polar", 4, 1)


# -- the straggler model -----------------------------------------------------------------------------
def test_bursty_model_checks_both_conditions():
    m = BurstyStragglerModel(B=2, W=4, lam=2)
    assert m.conforms([{0}, {0}, set(), set(), set(), {0}])  # bursts of <= 2, W rounds apart
    assert not m.conforms([{0}, {0}, set(), set(), {0}])  # rounds 1..4 hold 1 and 4: too spread
    assert not m.conforms([{0}, {0}, {0}])  # burst longer than B
    assert not m.conforms([{0}, set(), {0}])  # two bursts inside one window of W
    assert m.conforms([{0}, set(), set(), set(), {0}])  # ... but fine W rounds apart
    assert not m.conforms([{0}, {1}, {2}])  # three distinct stragglers in a window
    assert m.conforms([{0, 1}, {0, 1}, set(), set(), set(), {2, 3}])
    assert not m.conforms([{0, 1}, {0, 1}, set(), set(), {2, 3}])  # 4 distinct in rounds 1..4
    with pytest.raises(ConfigError, match="1 <= B < W"):
        BurstyStragglerModel(B=3, W=3, lam=1)


@pytest.mark.parametrize("seed", range(3))
def test_sampled_patterns_conform_and_straggle(seed):
    m = BurstyStragglerModel(B=2, W=5, lam=3)
    pattern = m.sample(8, 60, p=0.3, seed=seed)
    assert m.conforms(pattern)
    assert sum(len(p) for p in pattern) > 20  # not trivially empty
    assert pattern == m.sample(8, 60, p=0.3, seed=seed)


# -- sequential gradient coding -------------------------------------------------------------------------
def test_sr_sgc_repeats_unfinished_tasks_b_rounds_later():
    # n = 4, (B, W, lambda) = (1, 2, 2): s = ceil(2/3) = 1, but round 0 loses 2 workers.
    sr = SelectiveRepeatSGC(4, B=1, W=2, lam=2, jobs=3)
    assert (sr.s, sr.delay, sr.load) == (1, 1, 0.5)
    assert sr.plan(0) == (0, 0, 0, 0)
    sr.observe(0, {0, 1})
    assert not sr.decodable(0)  # 2 of the 3 needed
    assert sr.plan(1) == (0, 1, 1, 1)  # v - s = 1 of the 2 missing workers redoes job 0
    sr.observe(1, set())
    assert sr.contributors(0) == [0, 2, 3] and sr.decodable(0)
    assert sr.run([]) == [True, True, True]  # finishes the remaining rounds
    # a plain (n, s) code would have lost job 0: 2 stragglers > s = 1
    with pytest.raises(ValueError):
        sr.code.decode_coefficients([2, 3])


def test_m_sgc_plans_uncoded_chunks_then_coded_groups():
    # n = 3, (B, W, lambda) = (1, 3, 1): 2 uncoded slots + 1 coded slot, delay W - 2 + B = 2.
    m = MultiplexedSGC(3, B=1, W=3, lam=1, jobs=2)
    assert (m.slots, m.delay) == (3, 2)
    assert m.load == pytest.approx(2 * 3 / (3 * (1 + 2 * 2)))
    # the data adds up: n (W - 1) uncoded chunks plus B coded groups
    assert 3 * 2 * m.chunk_fraction + 1 * m.group_fraction == pytest.approx(1.0)
    assert m.plan(0)[0] == (Minitask(0, False, 0), None, None)
    m.observe(0, {1})  # worker 1 misses chunk 0 of job 0
    assert m.plan(1)[1] == (Minitask(1, False, 0), Minitask(0, False, 1), None)
    m.observe(1, set())
    assert m.plan(2)[1][2] == Minitask(0, False, 0)  # redo the chunk instead of the coded task
    assert m.plan(2)[0][2] == Minitask(0, True, 0)
    m.observe(2, set())
    assert m.coded_results(0, 0) == [0, 2] and m.decodable(0)  # n - lambda = 2 coded results


PARAMS = [(4, 1, 2, 1), (6, 1, 3, 2), (6, 2, 3, 2), (8, 2, 5, 3), (5, 1, 4, 2), (8, 1, 2, 4),
          (6, 2, 5, 6)]  # fmt: skip


@pytest.mark.parametrize("n, B, W, lam", PARAMS)
def test_every_job_decodes_by_its_deadline_under_the_model(n, B, W, lam):
    """The papers' claim, checked on random patterns of the (B, W, lambda) model."""
    model = BurstyStragglerModel(B, W, lam)
    for seed in range(6):
        pattern = model.sample(n, 30, p=0.35, seed=seed)
        assert all(MultiplexedSGC(n, B, W, lam, jobs=25).run(pattern))
        if (W - 1) % B == 0 and math.ceil(B * lam / (W - 1 + B)) < n:
            assert all(SelectiveRepeatSGC(n, B, W, lam, jobs=25).run(pattern))


def test_rounds_outside_the_model_wait_for_everybody():
    sr = SelectiveRepeatSGC(4, B=1, W=2, lam=1, jobs=2)
    sr.plan(0)
    assert sr.observe(0, {0, 1, 2}) == frozenset()  # 3 > lambda: the master waits for all
    sr2 = SelectiveRepeatSGC(4, B=1, W=2, lam=1, jobs=2)
    assert sr2.run([{0, 1, 2}, {0, 1, 2}, {0, 1, 2}], enforce_model=False) == [False, False]


def test_loads_order_m_sgc_below_sr_sgc_below_plain_coding():
    n, B, W, lam = 20, 1, 2, 4
    sr = SelectiveRepeatSGC(n, B, W, lam, jobs=1)
    ms = MultiplexedSGC(n, B, W, lam, jobs=1)
    plain = (lam + 1) / n  # one (n, lambda) code per round
    assert (ms.load, sr.load, plain) == pytest.approx((10 / 120, 3 / 20, 5 / 20))
    assert MultiplexedSGC(4, 1, 3, 4, jobs=1).load == pytest.approx(3 / 8)  # lambda = n


@pytest.mark.parametrize(
    "cls, kw, match",
    [
        (SelectiveRepeatSGC, dict(n=4, B=2, W=4, lam=1), "B to divide W - 1"),
        (SelectiveRepeatSGC, dict(n=4, B=1, W=1, lam=1), "1 <= B < W"),
        (MultiplexedSGC, dict(n=4, B=1, W=3, lam=5), "cannot exceed n"),
        (SelectiveRepeatSGC, dict(n=1, B=1, W=2, lam=1), "s = ceil"),  # s = 1 >= n
    ],
)
def test_sequential_schemes_reject_bad_parameters(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(jobs=3, **kw)


# -- straggler injection and the coded round -----------------------------------------------------------
def test_injector_is_deterministic_and_capped():
    inj = StragglerInjector(8, p=0.3, delay_s=0.3, max_stragglers=2, seed=4)
    rounds = [inj.stragglers(r) for r in range(50)]
    again = StragglerInjector(8, p=0.3, max_stragglers=2, seed=4)
    assert rounds == [again.stragglers(r) for r in range(50)]
    assert max(len(s) for s in rounds) == 2 and min(len(s) for s in rounds) < 2
    slow = next(iter(rounds[0]))
    assert inj.delay(0, slow) == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        StragglerInjector(4, p=1.5)


def _coded_body(comm, make, rounds, d, slow_s):
    """The last rank is slow in every round; root drains the late messages only at the end."""
    code = make()
    out, results = [], []
    for r in range(rounds):
        g = torch.randn(code.n, d, dtype=f64, generator=torch.Generator().manual_seed(r))
        parts = {j: g[j] for j in code.parts(comm.rank)}
        delay = slow_s if comm.rank == code.n - 1 else 0.0
        res = coded_round(comm, code, parts, round_=r, delay_s=delay)
        out.append((res.gradient, g.sum(0), res.survivors, res.seconds))
        results.append(res)
    for res in results:
        res.wait_stragglers()
    return out, comm.stats.by_op()


@pytest.mark.parametrize("make", [lambda: cyclic_mds(4, 1), lambda: fractional_repetition(4, 1)])
def test_coded_round_finishes_without_the_straggler(make):
    n, d, rounds, slow_s = 4, 257, 2, 0.6
    res = run_ranks(n, _coded_body, make, rounds, d, slow_s)
    slow = n - 1
    for r in range(rounds):
        root_grad, exact, survivors, root_s = res[0][0][r]
        assert slow not in survivors and len(survivors) == n - 1
        assert root_s < slow_s / 2  # root did not wait for the straggler
        for rank in range(n):  # every rank holds the decoded full gradient
            torch.testing.assert_close(res[rank][0][r][0], exact, rtol=1e-12, atol=1e-12)
        assert res[slow][0][r][3] >= slow_s
    nbytes = rounds * d * 8
    assert res[0][1]["recv"]["bytes_recv"] == (n - 1) * nbytes
    assert res[0][1]["send"]["bytes_sent"] == (n - 1) * nbytes
    for rank in range(1, n):
        assert res[rank][1]["send"]["bytes_sent"] == nbytes
        assert res[rank][1]["recv"]["bytes_recv"] == nbytes


def test_coded_round_needs_a_matching_group():
    def body(comm):
        with pytest.raises(ConfigError, match="needs a group of 4"):
            coded_round(comm, cyclic_mds(4, 1), {})

    run_ranks(2, body)
