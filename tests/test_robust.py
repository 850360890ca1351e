import dataclasses
import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lowband.algorithms.robust import ATTACK_NAMES, check_robust_options
from lowband.comm import get_codec
from lowband.config import TrainConfig
from lowband.errors import ConfigError
from lowband.robust import (
    AGGREGATORS,
    RobustReducer,
    apply_attack,
    bulyan,
    centered_clipping,
    coordinate_median,
    finite_rows,
    flag_aggregator,
    flip_labels,
    geometric_median,
    get_aggregator,
    get_attack,
    krum,
    mean,
    multi_krum,
    robust_all_reduce,
    robust_all_reduce_bytes,
    trimmed_mean,
)
from lowband.robust.attacks import alie, alie_z_max, ipm, sign_flip
from lowband.robust.flag import flag_subspace
from lowband.testing import run_ranks

f64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: one intra-op thread avoids OpenMP oversubscription, which made
    small LAPACK calls 10-300x slower on a machine whose cores were busy with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cluster(n_honest, f, d=16, spread=0.1, outlier=1e3, seed=0, dtype=f64):
    """n_honest updates near a common centre, then f far-away outliers (rows n_honest..)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(d, generator=g, dtype=dtype)
    honest = centre + spread * torch.randn(n_honest, d, generator=g, dtype=dtype)
    bad = outlier * torch.randn(f, d, generator=g, dtype=dtype)
    return torch.cat([honest, bad]), honest


# -- textbook references (loops, straight from the papers) ----------------------------------------
def ref_krum_scores(x, k):
    n = x.shape[0]
    scores = []
    for i in range(n):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    return scores


def ref_bulyan(x, f):
    n = x.shape[0]
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = x[remaining]
        scores = ref_krum_scores(sub, max(len(remaining) - f - 2, 0))
        # ties (f = 1 ends with zero neighbours, every score 0) go to the smallest row by value
        best = min(range(len(scores)), key=lambda j: (scores[j], sub[j].tolist()))
        selected.append(remaining.pop(best))
    sel = x[sorted(selected)]
    beta = sel.shape[0] - 2 * f
    out = torch.empty(x.shape[1], dtype=x.dtype)
    for c in range(x.shape[1]):
        col = sel[:, c]
        med = (
            col.median()
            if col.numel() % 2
            else col.sort().values[col.numel() // 2 - 1 :][:2].mean()
        )
        closest = sorted(col.tolist(), key=lambda v: (abs(v - float(med)), v))[:beta]
        out[c] = sum(closest) / beta
    return out


def ref_flag(g, r, iters, lam=0.0):
    """The reference algorithm with explicit d x r matrices and SVDs, started at the flag mean."""
    x = F.normalize(g, dim=1).T  # d x n unit columns
    n = x.shape[1]

    def top(cols):
        return torch.linalg.svd(cols, full_matrices=False)[0][:, :r]

    def err(y):
        return (1 - (y.T @ x).square().sum(0)).clamp_min(0).sqrt().sum()

    y = top(x)
    for _ in range(iters):
        cols = [((1 - (y.T @ x).square().sum(0)).abs() + 1e-7).pow(-0.25) * x]
        if lam > 0:
            for i in range(n):
                for j in range(n):
                    if i != j:
                        dxy = (x[:, i] - x[:, j])[:, None]
                        w = ((1 - (y.T @ dxy).square().sum()).abs() + 1e-7).pow(-0.25)
                        cols.append(w * lam / (n * (n - 1)) * dxy)
        y_new = top(torch.cat(cols, dim=1))
        if not err(y_new) < err(y) - 1e-10:
            if err(y_new) < err(y):
                y = y_new
            break
        y = y_new
    return (y @ (y.T @ x)).sum(1) / r


# -- registry and preconditions --------------------------------------------------------------------
def test_registry_names_aliases_and_errors():
    x, _ = cluster(7, 0)
    for name in AGGREGATORS:
        out = get_aggregator(name, f=1)(x)
        assert out.shape == (16,) and out.dtype == f64
    assert torch.equal(get_aggregator("median")(x), coordinate_median(x))
    assert torch.equal(get_aggregator("GeoMed")(x), geometric_median(x))
    with pytest.raises(ConfigError, match="unknown aggregator 'nope'"):
        get_aggregator("nope")
    with pytest.raises(ConfigError, match="has no option"):
        get_aggregator("krum", f=1, tau=3)
    with pytest.raises(ConfigError, match="non-negative integer"):
        get_aggregator("krum", f=-1)


@pytest.mark.parametrize(
    "name, n, f, rule",
    [
        ("krum", 6, 2, "n > 2f \\+ 2"),
        ("multi_krum", 4, 1, "n > 2f \\+ 2"),
        ("bulyan", 10, 2, "n >= 4f \\+ 3"),
        ("bulyan", 6, 1, "n >= 4f \\+ 3"),
        ("trimmed_mean", 4, 2, "n > 2f"),
    ],
)
def test_preconditions_raise_config_errors(name, n, f, rule):
    x, _ = cluster(n, 0)
    with pytest.raises(ConfigError, match=rule):
        AGGREGATORS[name](x, f=f)
    with pytest.raises(ConfigError, match=rule):
        get_aggregator(name, f=f, n=n)  # checked up front when n is known


def test_boundary_cases_are_accepted():
    x, _ = cluster(7, 0)
    krum(x[:5], f=1)  # n = 2f + 3
    bulyan(x, f=1)  # n = 4f + 3
    trimmed_mean(x[:3], f=1)  # n = 2f + 1


# -- defining properties -----------------------------------------------------------------------------
@pytest.mark.parametrize("f", [1, 2, 3])
def test_median_and_trimmed_mean_ignore_outliers(f):
    x, honest = cluster(10 - f, f, outlier=1e3)
    y = x.clone()
    y[10 - f :] *= 1e6  # wilder outliers: nothing may change
    lo, hi = honest.min(0).values, honest.max(0).values
    for rule in (coordinate_median, lambda t: trimmed_mean(t, f)):
        out = rule(x)
        assert torch.equal(out, rule(y))
        assert bool(((out >= lo) & (out <= hi)).all())
    assert (mean(x) - honest.mean(0)).abs().max() > 10  # while the mean is dragged away


def test_median_even_n_averages_the_middle_pair():
    x = torch.tensor([[1.0], [2.0], [10.0], [4.0]], dtype=f64)
    assert coordinate_median(x).item() == 3.0
    assert trimmed_mean(x, 1).item() == 3.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n, f", [(5, 1), (7, 2), (10, 3)])
def test_krum_selects_an_honest_update(n, f, seed):
    x, honest = cluster(n - f, f, seed=seed)
    x[n - f :] = x[n - f]  # colluding attackers send one identical vector
    out = krum(x, f)
    assert any(torch.equal(out, h) for h in honest)
    scores = ref_krum_scores(x, n - f - 2)
    assert torch.equal(out, x[scores.index(min(scores))])


def test_multi_krum_averages_the_best_scored():
    x, honest = cluster(7, 3, seed=1)
    scores = ref_krum_scores(x, 10 - 3 - 2)
    best = sorted(range(10), key=lambda i: (scores[i], i))[:5]
    torch.testing.assert_close(multi_krum(x, 3, m=5), x[sorted(best)].mean(0))
    assert all(i < 7 for i in best)  # only honest ones among the best 5
    torch.testing.assert_close(multi_krum(x, 0, m=10), x.mean(0))


@pytest.mark.parametrize("n, f", [(7, 1), (11, 2)])
def test_bulyan_matches_textbook_and_ignores_outliers(n, f):
    x, honest = cluster(n - f, f, seed=2)
    out = bulyan(x, f)
    torch.testing.assert_close(out, ref_bulyan(x, f), rtol=1e-12, atol=1e-12)
    lo, hi = honest.min(0).values, honest.max(0).values
    assert bool(((out >= lo) & (out <= hi)).all())


def test_geometric_median_converges_and_resists_outliers():
    x, honest = cluster(7, 3, spread=1.0, outlier=50.0, seed=3)
    z = geometric_median(x, tol=1e-12, max_iters=1000)
    unit = (x - z) / torch.linalg.vector_norm(x - z, dim=1, keepdim=True)
    assert torch.linalg.vector_norm(unit.sum(0)) < 1e-6  # first-order optimality
    obj = lambda p: torch.linalg.vector_norm(x - p, dim=1).sum()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert obj(z) <= obj(z + 1e-3 * torch.randn(16, generator=g, dtype=f64))
    # 3 of 10 far away move it by far less than they move the mean
    shift = torch.linalg.vector_norm(z - geometric_median(honest, tol=1e-12, max_iters=1000))
    assert shift < 0.1 * torch.linalg.vector_norm(mean(x) - honest.mean(0))


def test_centered_clipping_bounds_each_worker_and_carries_state():
    x, honest = cluster(7, 3, spread=0.1, outlier=100.0, seed=4)
    ref = honest.mean(0)
    out = centered_clipping(x, tau=1.0, iters=1, reference=ref)
    # each outlier moves v by at most tau / n; honest ones (within tau) pass unclipped
    honest_part = (honest - ref).sum(0) / 10
    assert torch.linalg.vector_norm(out - ref - honest_part) <= 3 * 1.0 / 10 + 1e-12
    assert torch.allclose(centered_clipping(x, tau=1e9, reference=ref), x.mean(0))
    cc = get_aggregator("centered_clipping", tau=1.0)
    first = cc(x)
    torch.testing.assert_close(first, centered_clipping(x, tau=1.0))
    torch.testing.assert_close(cc(x), centered_clipping(x, tau=1.0, reference=first))


# -- flag aggregator -------------------------------------------------------------------------------
def test_flag_returns_unanimous_update_and_reference_scale():
    g = torch.randn(32, dtype=f64)
    same = g.repeat(6, 1)
    for r in (1, 2):
        torch.testing.assert_close(flag_aggregator(same, r=r), g)
    # the reference formula: (1/r) sum of 6 unit vectors, norm 6/r
    ref = flag_aggregator(same, r=1, rescale=False)
    torch.testing.assert_close(ref, 6 * g / g.norm())
    # one direction, different norms: the median norm sets the scale, not the largest one
    scaled = torch.tensor([0.5, 1.0, 2.0, 3.0, 1e6], dtype=f64)[:, None] * g
    torch.testing.assert_close(flag_aggregator(scaled, r=1), 2.0 * g)


@pytest.mark.parametrize("r, lam", [(1, 0.0), (2, 0.0), (4, 0.0), (2, 0.5)])
def test_flag_matches_the_explicit_reference_algorithm(r, lam):
    g = torch.randn(7, 40, dtype=f64, generator=torch.Generator().manual_seed(r))
    ours = flag_aggregator(g, r=r, lam=lam, iters=10, rescale=False)
    torch.testing.assert_close(ours, ref_flag(g, r, iters=10, lam=lam), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_flag_output_lies_in_the_honest_subspace(lam):
    gen = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(60, 2, generator=gen, dtype=f64))[0]  # honest span
    honest = (u @ torch.randn(2, 7, generator=gen, dtype=f64)).T
    bad = 5 * torch.randn(3, 60, generator=gen, dtype=f64)
    x = torch.cat([honest, bad])

    def off_subspace(v):
        return float(torch.linalg.vector_norm(v - u @ (u.T @ v)) / torch.linalg.vector_norm(v))

    out = flag_aggregator(x, r=2, lam=lam)
    assert off_subspace(out) < 1e-3
    assert off_subspace(mean(x)) > 0.5
    c, k, _ = flag_subspace(x, r=2, lam=lam)
    weights = ((1 - (c.T @ k).square().sum(0)).abs() + 1e-7).pow(-0.25)
    assert weights[:7].min() > 10 * weights[7:].max()  # outliers are down-weighted
    # an attacker's norm does not matter, only its direction
    y = x.clone()
    y[7:] *= 1e6
    torch.testing.assert_close(flag_aggregator(y, r=2, lam=lam), out)


def test_flag_keeps_fp32_and_zero_updates():
    x = torch.randn(5, 10)
    x[2] = 0
    out = flag_aggregator(x, r=1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# -- non-finite and absurd updates (issue #20) -----------------------------------------------------
BAD_ROWS = {  # kind -> (the attacker row's entries, dtype)
    "nan": (float("nan"), torch.float32),
    "inf": (float("inf"), torch.float32),
    "one-nan-entry": ("one-nan", f64),  # an honest-looking row with a single NaN
    "1e19-fp32": (1e19, torch.float32),  # its sum of squares overflows fp32 at d = 1000
    "1e300-fp64": (1e300, f64),  # and fp64's
}
SELECTING = ("coordinate_median", "trimmed_mean", "krum", "multi_krum", "bulyan")
"""Rules whose output lies in the honest rows' coordinate box once the attacker is out."""
AVERAGING = {
    "mean": 1e-6,
    "geometric_median": 0.05,
    "centered_clipping": 0.3,
    "flag_aggregator": 0.2,
}
"""The others: |out - honest mean| / |honest mean| at most this. Measured with an absurd row (a
dropped row leaves under 0.002): geomed 0.016; centered clipping 0.20, the attacker's clipped
tau / n; flag 0.14, the attacker's direction, orthogonal to Y, still counts in the 1/n."""


def with_bad_row(kind, d=1000, at=2):
    """Six honest rows (cluster) and, at row `at`, one attacker row of the given kind."""
    value, dtype = BAD_ROWS[kind]
    _, honest = cluster(6, 0, d=d, dtype=dtype)
    bad = honest[:1].clone()
    if value == "one-nan":
        bad[0, d // 2] = float("nan")
    else:
        bad.fill_(value)
    return torch.cat([honest[:at], bad, honest[at:]]), honest


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_one_non_finite_or_absurd_row_does_not_reach_any_rule_output(kind):
    x, honest = with_bad_row(kind)
    assert finite_rows(x)[1] == (0 if kind.startswith("1e") else 1)
    assert torch.equal(finite_rows(honest)[0], honest)  # clean input: the rows themselves
    lo, hi = honest.min(0).values, honest.max(0).values
    centre = honest.mean(0)
    assert set(SELECTING) | set(AVERAGING) == set(AGGREGATORS)
    for name in AGGREGATORS:
        out = get_aggregator(name, f=1)(x)
        assert out.shape == centre.shape and out.dtype == x.dtype, name
        assert bool(torch.isfinite(out).all()), (kind, name)
        if name in SELECTING:
            assert bool(((out >= lo) & (out <= hi)).all()), (kind, name)
        elif name != "mean" or not kind.startswith("1e"):  # the mean tolerates no finite attacker
            rel = float(torch.linalg.vector_norm(out - centre) / torch.linalg.vector_norm(centre))
            assert rel <= AVERAGING[name], (kind, name, rel)


def test_stateful_centered_clipping_recovers_after_a_bad_round():
    for kind in BAD_ROWS:
        x, honest = with_bad_row(kind)
        cc = get_aggregator("centered_clipping")
        assert bool(torch.isfinite(cc(x)).all()), kind
        for _ in range(3):  # clean rounds: the reference moves back to the honest mean
            out = cc(honest)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(cc.reference).all()), kind
        centre = honest.mean(0)
        err = torch.linalg.vector_norm(out - centre) / torch.linalg.vector_norm(centre)
        assert err <= 0.01, (kind, float(err))


def test_no_finite_row_gives_no_update():
    x = torch.full((7, 5), float("nan"), dtype=f64)
    x[3] = float("inf")
    for name in AGGREGATORS:
        assert torch.equal(get_aggregator(name, f=1)(x), torch.zeros(5, dtype=f64)), name
    cc = get_aggregator("centered_clipping")
    ref = cc(torch.randn(7, 5, dtype=f64)).clone()
    assert torch.equal(cc(x), torch.zeros(5, dtype=f64))
    assert torch.equal(cc.reference, ref)  # a round with nothing to aggregate keeps the reference


def test_rejected_rows_count_against_f():
    """The dropped rows were Byzantine: a rule runs on the rest with f lowered by their number, so
    its precondition still holds (krum n = 5, f = 1 with one row dropped: 4 rows, f = 0)."""
    x, honest = cluster(4, 0, seed=7)
    x = torch.cat([x, torch.full((1, 16), float("nan"), dtype=f64)])
    torch.testing.assert_close(trimmed_mean(x, 1), honest.mean(0))  # f = 0 left: the mean
    torch.testing.assert_close(multi_krum(x, 1), honest.mean(0))  # m = n - f = 4: all honest
    assert any(torch.equal(krum(x, 1), h) for h in honest)
    rows = torch.cat([honest, honest[:2], x[4:]])  # n = 7 = 4f + 3 with f = 1, one row NaN
    torch.testing.assert_close(bulyan(rows, 1), rows[:6].mean(0))  # f = 0 left: all, averaged


# -- tie-breaks: no rule depends on the order of the rows -------------------------------------------
def tied_rows():
    """+-e_1, +-e_2, +-e_3 and one attacker at (10, 10, 10, 10): integer distances, so every honest
    Krum score ties exactly (8 with n - f - 2 = 4 neighbours)."""
    e = torch.eye(4, dtype=f64)[:3]
    return torch.cat([e, -e, torch.full((1, 4), 10.0, dtype=f64)])


SELECTIONS = {
    "krum": lambda t: krum(t, 1),
    "multi_krum": lambda t: multi_krum(t, 1),
    "multi_krum(m=3)": lambda t: multi_krum(t, 1, m=3),
    "krum(neighbours=0)": lambda t: krum(t, 1, neighbours=0),
    "bulyan": lambda t: bulyan(t, 1),  # f = 1: the last Krum steps have zero neighbours
}


@pytest.mark.parametrize("data", ["tied", "cluster"])
def test_no_rule_depends_on_the_order_of_the_rows(data):
    x = tied_rows() if data == "tied" else cluster(6, 1, seed=6, outlier=3.0)[0]
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(7, generator=gen) for _ in range(6)] + [torch.arange(6, -1, -1)]
    for name, rule in SELECTIONS.items():
        expect = rule(x)
        for p in perms:
            assert torch.equal(rule(x[p]), expect), (data, name, p.tolist())
    if data == "tied":
        # the documented rule: the lexicographically smallest of the tied rows, -e_1
        assert krum(x, 1).tolist() == [-1.0, 0.0, 0.0, 0.0]
        return
    for name in AGGREGATORS:  # fresh rules: centered clipping starts from zeros each time
        expect = get_aggregator(name, f=1)(x)
        for p in perms:
            out = get_aggregator(name, f=1)(x[p])
            torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-9, msg=name)


# -- attacks ---------------------------------------------------------------------------------------
def test_attacks_follow_their_definitions():
    h = torch.randn(7, 12, dtype=f64)
    torch.testing.assert_close(sign_flip(h, 3), -h.mean(0).expand(3, -1))
    torch.testing.assert_close(ipm(h, 2), -2 * h.mean(0).expand(2, -1))
    torch.testing.assert_close(alie(h, 1), (h.mean(0) + 1.5 * h.std(0)).expand(1, -1))
    g = torch.Generator().manual_seed(0)
    noise = get_attack("gaussian", sigma=3.0)(h, 4, generator=g)
    assert noise.shape == (4, 12) and not torch.equal(noise[0], noise[1])
    rnd = get_attack("random")(h, 2, generator=g)
    torch.testing.assert_close(rnd.norm(dim=1), h.mean(0).norm().expand(2))
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    # ALIE's z_max (Baruch et al.): n = 50, f = 24 -> s = 2, Phi^-1(48/50)
    assert alie_z_max(50, 24) == pytest.approx(1.7507, abs=1e-4)


def test_nan_and_inf_attacks():
    h = torch.randn(5, 3, dtype=f64)
    assert torch.isnan(get_attack("nan")(h, 2)).all() and get_attack("nan")(h, 2).shape == (2, 3)
    assert torch.equal(get_attack("inf")(h, 1), torch.full((1, 3), float("inf"), dtype=f64))
    for name in ("nan", "inf"):  # --attack nan / --attack inf pass the CLI's checks
        assert name in ATTACK_NAMES
        cfg = TrainConfig(workers=4, aggregate="median", byzantine_tolerance=1, attack=name)
        check_robust_options(dataclasses.replace(cfg, attackers=1))


def test_attack_registry_errors_and_apply():
    with pytest.raises(ConfigError, match="unknown attack"):
        get_attack("nope")
    with pytest.raises(ConfigError, match="data-level"):
        get_attack("label_flip")
    with pytest.raises(ConfigError, match="no option"):
        get_attack("ipm", sigma=1.0)
    x = torch.randn(5, 4, dtype=f64)
    y = apply_attack(x, [1, 3], get_attack("ipm", tau=3.0))
    torch.testing.assert_close(y[[0, 2, 4]], x[[0, 2, 4]])
    torch.testing.assert_close(y[1], -3 * x[[0, 2, 4]].mean(0))
    with pytest.raises(ConfigError, match="distinct ranks"):
        apply_attack(x, [5], sign_flip)


# -- ByzFL as an independent reference --------------------------------------------------------------
@pytest.fixture(scope="module")
def byzfl():
    """ByzFL's aggregators and attacks modules. Its package __init__ imports its federated
    framework, which needs a torchvision built for the installed torch (a CPU-only torch has none
    on PyPI), so the two submodules are loaded under a bare parent package instead."""
    spec = importlib.util.find_spec("byzfl")
    # `make test` installs byzfl (--no-deps) and scipy: a missing reference is a failure, not a skip.
    assert spec is not None, (
        "byzfl is not installed: run `make install` (pip install --no-deps byzfl==0.0.11)"
    )
    saved = sys.modules.get("byzfl")
    stub = types.ModuleType("byzfl")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = stub
    try:
        agg = importlib.import_module("byzfl.aggregators")
        att = importlib.import_module("byzfl.attacks")
    finally:
        if saved is None:
            sys.modules.pop("byzfl", None)
        else:
            sys.modules["byzfl"] = saved
    return types.SimpleNamespace(agg=agg, att=att)


@pytest.mark.parametrize("n, f", [(7, 1), (10, 3), (8, 2)])
def test_aggregators_agree_with_byzfl(byzfl, n, f):
    # ByzFL computes in fp32 whatever the input: compare fp32 to fp32.
    x = cluster(n - f, f, outlier=5.0, seed=n)[0].float()
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(coordinate_median(x), byzfl.agg.Median()(x), **close)
    torch.testing.assert_close(trimmed_mean(x, f), byzfl.agg.TrMean(f=f)(x), **close)
    # ByzFL scores Krum over n - f - 1 neighbours (Blanchard et al.: n - f - 2) and Multi-Krum
    # averages n - f: same rule once the neighbour count is matched.
    torch.testing.assert_close(krum(x, f, neighbours=n - f - 1), byzfl.agg.Krum(f=f)(x))
    torch.testing.assert_close(
        krum(x, f, slack=1), byzfl.agg.Krum(f=f)(x)
    )  # --krum-neighbours byzfl
    torch.testing.assert_close(
        multi_krum(x, f, m=n - f, neighbours=n - f - 1), byzfl.agg.MultiKrum(f=f)(x), **close
    )
    # Weiszfeld with ByzFL's smoothing nu = 0.1, run to convergence on both sides.
    ours = geometric_median(x.double(), nu=0.1, tol=1e-12, max_iters=2000).float()
    torch.testing.assert_close(ours, byzfl.agg.GeometricMedian(nu=0.1, T=2000)(x), **close)
    theirs = byzfl.agg.CenteredClipping(L=3, tau=2.0)(x)  # reference zeros
    torch.testing.assert_close(centered_clipping(x, tau=2.0, iters=3), theirs, **close)


def test_attacks_agree_with_byzfl(byzfl):
    h = torch.randn(7, 12)
    torch.testing.assert_close(sign_flip(h, 1)[0], byzfl.att.SignFlipping()(h))
    torch.testing.assert_close(ipm(h, 1)[0], byzfl.att.InnerProductManipulation(tau=2.0)(h))
    torch.testing.assert_close(alie(h, 1)[0], byzfl.att.ALittleIsEnough(tau=1.5)(h))


# -- robust_all_reduce -------------------------------------------------------------------------------
def _robust_body(comm, name, f, codec_name, numel, attack):
    g = torch.Generator().manual_seed(100 + comm.rank)
    x = torch.randn(numel, generator=g)
    codec = get_codec(codec_name) if codec_name else None
    agg = get_aggregator(name, f=f)
    kw = {}
    if attack:
        kw = dict(
            attack=get_attack(attack), attackers=[1], generator=torch.Generator().manual_seed(7)
        )
    out = robust_all_reduce(comm, x, agg, codec, **kw)
    return x, out, comm.stats.by_op()["all_gather"]


@pytest.mark.parametrize(
    "name, f, codec_name, attack",
    [
        ("coordinate_median", 1, None, None),
        ("krum", 0, "int8", None),  # 4 ranks: Krum tolerates f = 0 only (n > 2f + 2)
        ("flag", 1, "bf16", "gaussian"),
    ],
)
def test_robust_all_reduce_identical_on_all_ranks_and_counts_bytes(name, f, codec_name, attack):
    n, numel = 4, 1001
    res = run_ranks(n, _robust_body, name, f, codec_name, numel, attack)
    outs = [r[1] for r in res]
    assert all(torch.equal(o, outs[0]) for o in outs)
    codec = get_codec(codec_name or "fp32")
    stacked = torch.stack([codec.decode(codec.encode(r[0]), numel) for r in res])
    if attack:
        stacked = apply_attack(stacked, [1], get_attack(attack), torch.Generator().manual_seed(7))
    torch.testing.assert_close(outs[0], get_aggregator(name, f=f)(stacked), rtol=0, atol=0)
    expect = robust_all_reduce_bytes(numel, n, codec)
    assert expect == (n - 1) * codec.payload_bytes(numel)
    for r in res:
        assert r[2]["bytes_sent"] == expect and r[2]["bytes_recv"] == expect


def _reducer_body(comm, attack):
    reducer = RobustReducer(comm, "median", 1, attack=attack, attackers=[comm.size - 1])
    x = torch.randn(33, generator=torch.Generator().manual_seed(comm.rank))
    return x, reducer(x, 0), reducer.last_rejected


@pytest.mark.parametrize("attack", ["nan", "inf"])
def test_reducer_drops_and_counts_non_finite_updates(attack):
    res = run_ranks(4, _reducer_body, attack)
    honest = torch.stack([r[0] for r in res[:3]])
    for _, out, rejected in res:
        assert rejected == 1
        assert torch.equal(out, coordinate_median(honest))


# -- end to end: 10 simulated workers, logistic regression -------------------------------------------
ROBUST = ["coordinate_median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
          "centered_clipping"]  # fmt: skip


def _problem(n=10, m=500, d=10, noise=1.0):
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(d, generator=g, dtype=f64)
    x = torch.randn(n, m, d, generator=g, dtype=f64)
    y = (x @ w_true + noise * torch.randn(n, m, generator=g, dtype=f64) > 0).to(f64)
    return x, y


def _train(x, y, agg, attack=None, f=0, steps=15, lr=2.0, batch=None):
    """Gradient descent, full batch or `batch` samples per worker per step; workers 0..f-1 are
    Byzantine. Returns the global loss."""
    n, m, d = x.shape
    w = torch.zeros(d, dtype=f64)
    gen = torch.Generator().manual_seed(1)
    draw = torch.Generator().manual_seed(2)
    for _ in range(steps):
        xb, yb = x, y
        if batch is not None:
            idx = torch.randint(0, m, (n, batch), generator=draw)
            xb, yb = x.gather(1, idx[..., None].expand(-1, -1, d)), y.gather(1, idx)
        grads = torch.einsum("nb,nbd->nd", torch.sigmoid(xb @ w) - yb, xb) / xb.shape[1]
        if attack is not None:
            grads = apply_attack(grads, range(f), attack, gen)
        w = w - lr * agg(grads)
    return float(F.binary_cross_entropy_with_logits(x.reshape(-1, d) @ w, y.reshape(-1)))


@pytest.mark.parametrize("attack", ["alie", "ipm", "sign_flip"])
def test_robust_aggregators_survive_attacks_that_hurt_the_mean(attack):
    x, y = _problem()
    clean = _train(x, y, mean)
    for f in (1, 2, 3):
        atk = get_attack(attack)
        plain = _train(x, y, mean, atk, f)
        robust = {}
        for name in ROBUST + (["bulyan"] if 10 >= 4 * f + 3 else []):
            robust[name] = _train(x, y, get_aggregator(name, f=f), atk, f)
            assert robust[name] <= 1.10 * clean, (attack, f, name, robust[name] / clean)
        if attack == "alie":
            # ALIE shifts each coordinate by tau * std; with honest full-batch gradients that
            # agree closely the mean moves by (f/n) * 1.5 std and hardly notices (measured:
            # within 2% of clean). It is built to fool robust rules, which also stay within 10%.
            # Where ALIE does hurt the mean: test_alie_hurts_the_mean_once_gradients_are_noisy.
            assert plain <= 1.05 * clean
            continue
        assert plain > max(robust.values()), (attack, f)
        assert plain > (1.03 if f == 1 else 1.10) * clean, (attack, f, plain / clean)


def test_alie_hurts_the_mean_once_gradients_are_noisy():
    """ALIE against the mean needs noisy honest gradients (a large std) and many attackers.

    Minibatches of 50, 60 steps at lr 1, f = 3 of 10 (measured, relative to clean: mean 1.029,
    median 1.070, trimmed mean 1.080, geomed 1.031, CC 1.035, Multi-Krum 1.120, Krum 1.280). The
    mean is measurably worse than clean while the coordinate-wise rules, geomed and CC stay within
    10%; ALIE is designed against selection rules, and Krum and Multi-Krum do worse than the mean.
    At f = 1, 2 the mean moves by 0.15 and 0.3 std per coordinate and is within 1% of clean: the
    issue's "mean measurably worse" holds under ALIE only from f = 3 here (docs/robust_and_coding.md).
    """
    x, y = _problem()
    kw = dict(steps=60, lr=1.0, batch=50)
    clean = _train(x, y, mean, **kw)
    atk, f = get_attack("alie"), 3
    plain = _train(x, y, mean, atk, f, **kw)
    assert plain > 1.02 * clean, plain / clean
    for name in ("coordinate_median", "trimmed_mean", "geometric_median", "centered_clipping"):
        loss = _train(x, y, get_aggregator(name, f=f), atk, f, **kw)
        assert loss <= 1.10 * clean, (name, loss / clean)
    for name in ("krum", "multi_krum"):
        assert _train(x, y, get_aggregator(name, f=f), atk, f, **kw) > plain, name
