"""`lowband simulate` (lowband.plan.simulate): with no stragglers and no failures it is the plan's
cost model, exactly; at small N it agrees with a real emulated run; it is reproducible from its
seed; stragglers hurt DDP more than DiLoCo; a failure costs what docs/plan.md says it does."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lowband.cli import main
from lowband.comm import LinkSpec
from lowband.comm.link import LinkMap
from lowband.models import build_model
from lowband.plan import Technique, Workload, predict
from lowband.plan.simulate import Failures, Network, Straggler, heal_bytes, simulate

torch.set_num_threads(1)
MODEL = build_model("1m", device="meta")
INTRA, INTER = LinkSpec.parse("10gbit:100us"), LinkSpec.parse("100mbit:40ms")
TECHNIQUES = [
    Technique("ddp"),
    Technique("ddp", bits=8),
    Technique("diloco", sync_every=10, bits=4),
    Technique("streaming-diloco", 20, 4, 2, bits=4),
    Technique("streaming-diloco", 20, 2, 1, compress="topk:0.05:2"),
]


def _workload(tokens_per_s=2e4, batch=8, seq=128, rounds_of=20, n=6) -> Workload:
    return Workload(
        params=MODEL.num_params(), layers=4, dim=128, batch_size=batch, seq_len=seq,
        tokens=rounds_of * 10 * n * batch * seq, tokens_per_s=tokens_per_s, model=MODEL,
    )  # fmt: skip


@pytest.mark.parametrize("technique", TECHNIQUES, ids=lambda t: t.label())
def test_without_stragglers_or_failures_it_is_the_plan(technique):
    w = _workload()
    net = Network.sites(6, 2, INTRA, INTER)  # the groups span both sites: the inter link
    r = simulate(w, technique, net)
    p = predict(w, technique, 6, INTER)
    assert not r.extrapolated and r.tokens == w.tokens
    assert r.step_s == pytest.approx(p.step_s, rel=1e-9)
    assert r.utilisation == pytest.approx(p.utilisation, rel=1e-9)
    assert r.bytes_per_worker == pytest.approx(r.steps * p.bytes_per_step, rel=1e-12)
    assert r.time_to_budget_s == pytest.approx(p.time_to_budget_s, rel=1e-9)


NOLOCO_CO2 = [
    Technique("noloco", sync_every=10, bits=16),
    Technique("noloco", sync_every=10, bits=32, group_size=3),
    Technique("co2", sync_every=10, bits=4),  # reduction shorter than a round: hidden
    Technique("co2", sync_every=10, bits=32),  # longer: the excess exposed
]


@pytest.mark.parametrize("technique", NOLOCO_CO2, ids=lambda t: t.label())
def test_noloco_and_co2_without_noise_are_the_plan(technique):
    """NoLoCo: the plan's step time, utilisation, bytes and time to budget, exactly (6 workers
    behind one link, so every group of g has the plan's link and size). CO2: the plan's bytes and
    steady-state step time exactly; the whole run is one pipeline drain longer, min(H t_c, s):
    the last round's reduction is waited for (CO2.close), the first hides behind nothing."""
    w = _workload()
    net = Network(workers=6, link=INTER)
    r = simulate(w, technique, net)
    p = predict(w, technique, 6, INTER)
    assert not r.extrapolated and r.tokens == w.tokens and r.steps == p.steps
    assert r.bytes_per_worker == pytest.approx(r.steps * p.bytes_per_step, rel=1e-12)
    if technique.algo == "noloco":
        assert r.step_s == pytest.approx(p.step_s, rel=1e-9)
        assert r.utilisation == pytest.approx(p.utilisation, rel=1e-9)
        assert r.time_to_budget_s == pytest.approx(p.time_to_budget_s, rel=1e-9)
        return
    drain = min(technique.sync_every * w.compute_s, p.sync_s)
    assert r.time_to_budget_s == pytest.approx(p.time_to_budget_s + drain, rel=1e-9)
    longer = simulate(dataclasses.replace(w, tokens=2 * w.tokens), technique, net)
    steady = (longer.wall_s - r.wall_s) / (longer.steps - r.steps)
    assert steady == pytest.approx(p.step_s, rel=1e-9)


def test_co2_hides_a_short_reduction_and_exposes_exactly_the_excess_of_a_long_one():
    """Round r's all-reduce (s seconds) runs behind round r+1's H t_c of compute. s < H t_c: no
    round waits, only the final drain (s) is exposed: utilisation R H t_c / (R H t_c + s). s >
    H t_c: rounds 2..R each wait exactly s - H t_c, plus the drain, s."""
    w = _workload()
    h, tc, rounds = 10, w.compute_s, 20
    for link, hidden in ((LinkSpec.parse("1gbit:1ms"), True), (INTER, False)):
        t = Technique("co2", sync_every=h, bits=32)
        r = simulate(w, t, Network(workers=6, link=link))
        s = predict(w, t, 6, link).sync_s
        assert r.steps == rounds * h and (s < h * tc) == hidden
        if hidden:
            assert r.exposed_s == pytest.approx(s, rel=1e-9)
            assert r.utilisation == pytest.approx(rounds * h * tc / (rounds * h * tc + s))
            assert r.utilisation > 0.99
        else:
            assert r.exposed_s == pytest.approx((rounds - 1) * (s - h * tc) + s, rel=1e-9)


def test_a_straggler_under_noloco_slows_only_its_group():
    """The same i.i.d. stragglers (lognormal 0.3, 64 workers, fast link, fixed seeds): DiLoCo's
    round waits for the slowest of all 64, NoLoCo's group for the slowest of its 2, so NoLoCo
    keeps more of its utilisation. And in one round, a rank one second late delays only its
    group's other member, not the world."""
    w = _workload(n=64)
    net = Network(workers=64, link=LinkSpec.parse("100gbit:10us"))
    stragglers = Straggler.parse("lognormal:0.3")
    for seed in range(2):
        util = {
            algo: simulate(
                w, Technique(algo, sync_every=10, bits=16), net, stragglers, seed=seed
            ).utilisation
            for algo in ("diloco", "noloco")
        }
        assert util["noloco"] > util["diloco"] + 0.05
    # one round, a group of 2 with one straggler: the other groups do not wait
    from lowband.plan.simulate_groups import GroupRun

    t = Technique("noloco", sync_every=10, bits=16, group_size=2)
    run = GroupRun(w, t, net, Straggler(), Failures(), seed=0)
    run.advance(10)
    run.clocks[5] += 1.0  # rank 5 one second late
    groups = [[2 * i, 2 * i + 1] for i in range(32)]
    run.exchange(groups, {})
    late = [r for r, c in zip(run.ranks, run.clocks) if c > 10 * w.compute_s + 0.5]
    assert late == [4, 5]


def test_noloco_failure_costs_only_its_group():
    """A failure during the inner steps (0.3 s of 0.51): the failed worker's round is lost, its partner waits for
    the detection and goes on alone; the other groups' clocks and rounds are untouched; no round
    is discarded."""
    from lowband.plan.simulate_groups import GroupRun

    n, w = 6, _workload()
    net = Network(workers=n, link=INTER)
    t = Technique("noloco", sync_every=10, bits=16)
    f = Failures(rate_per_hour=0.0, recovery_s=1.0, detect_s=5.0)
    run = GroupRun(w, t, net, Straggler(), f, seed=0, fail_at=((0.3, 3),))
    run.advance(10)
    done = run.exchange([[0, 1], [2, 3], [4, 5]], {})
    secs = predict(w, t, n, INTER).sync_s
    end = {r: c for r, c in zip(run.ranks, run.clocks)}
    assert done == 5 and run.failed == 1 and run.discarded == 0 and 3 not in end
    assert end[2] == pytest.approx(0.3 + f.detect_s)
    for r in (0, 1, 4, 5):
        assert end[r] == pytest.approx(10 * w.compute_s + secs)
    r = simulate(w, t, net, failures=f, fail_at=((0.3, 3),))
    assert r.discarded_rounds == 0 and r.tokens >= w.tokens and r.heal_s > 0


def test_group_links_are_the_slowest_pair_as_the_link_map_says():
    net = Network.sites(7, 3, INTRA, INTER)
    m = net.link_map
    for ranks in ([0, 1], [0, 1, 2], [2, 3], [0, 6], list(range(7)), [5]):
        assert net.group_link(ranks) == m.for_ranks(ranks)
    pairs = LinkMap.from_dict({"default": "1gbit:1ms", "pairs": [[0, 3, "10mbit:90ms"]]})
    net = Network(workers=4, link_map=pairs)
    assert net.group_link([0, 1, 2]) == LinkSpec.parse("1gbit:1ms")
    assert net.group_link([0, 1, 3]).latency_s == pytest.approx(0.09)


def test_a_seed_gives_the_same_run_and_another_seed_another():
    w = _workload()
    net = Network.sites(6, 2, INTRA, INTER)
    t = Technique("diloco", sync_every=10, bits=4)
    noisy = dict(straggler=Straggler.parse("lognormal:0.3"), failures=Failures(20.0, 3.0, 1.0))
    a, b = (simulate(w, t, net, seed=7, **noisy).row() for _ in range(2))
    c = simulate(w, t, net, seed=8, **noisy).row()
    assert a == b and a["failures"] > 0
    assert c["wall_s"] != a["wall_s"]


def test_stragglers_slow_ddp_more_than_diloco():
    # A fast link, so that the difference is the synchronisation points: DDP waits for the
    # slowest of 64 draws every step, DiLoCo for the slowest of 64 sums of H draws.
    w = _workload(n=64)
    net = Network(workers=64, link=LinkSpec.parse("100gbit:10us"))
    for t in (Technique("ddp"), Technique("diloco", sync_every=20)):
        even = simulate(w, t, net)
        for seed in range(3):
            slow = simulate(w, t, net, Straggler.parse("lognormal:0.3"), seed=seed)
            loss = 1 - slow.utilisation / even.utilisation
            if t.algo == "ddp":
                ddp_loss = loss
                assert loss > 0.3  # E[max of 64 lognormal(0.3)] is ~1.8x the mean
            else:
                assert 0 < loss < ddp_loss / 3


def test_a_failure_costs_its_round_the_detection_and_the_heal():
    """docs/plan.md: a failure during a collective discards the round for everyone; the members
    learn it detect_s later; the recovered worker joins at the next collective, every member
    stalling for its state download at the link's speed; it contributes from the round after."""
    n, h = 4, 10
    w = _workload(n=n)
    link = LinkSpec.parse("100mbit:40ms")
    net = Network(workers=n, link=link)
    t = Technique("diloco", sync_every=h, bits=32)
    tc = w.compute_s
    clean = simulate(w, t, net)
    sync = predict(w, t, n, link).sync_s
    rnd = h * tc + sync
    assert clean.wall_s == pytest.approx(20 * rnd)  # the budget: 20 rounds of 4 workers
    fail_at = rnd + h * tc + sync / 2  # mid-collective of the second round
    f = Failures(rate_per_hour=0.0, recovery_s=1.0, detect_s=5.0)
    r = simulate(w, t, net, failures=f, fail_at=((fail_at, 2),))
    heal = link.ideal_time(heal_bytes(w, t), 1)
    assert (r.failures, r.discarded_rounds) == (1, 1) and r.heal_s == pytest.approx(heal)
    # round 1 lost; round 2 commits 3 workers (the joiner heals in it); 80 - 4 - 3 = 73 worker-
    # rounds remain: 19 more full rounds (76)
    expected = fail_at + f.detect_s + (h * tc + heal + sync) + 19 * rnd
    assert r.wall_s == pytest.approx(expected, rel=1e-9)
    # A failure during the inner steps only drops that worker's round: no round discarded.
    early = simulate(w, t, net, failures=f, fail_at=((rnd + tc, 2),))
    assert early.discarded_rounds == 0 and early.tokens >= w.tokens


def test_agrees_with_a_real_emulated_run(tmp_path):
    """A 2-worker DiLoCo run over 20mbit:20ms (15 steps, H=5): its bytes are the simulator's,
    exactly; its wall per step is the simulator's, given the run's own measured compute time,
    within 25%. The model has no term for Gloo's own transfer and the Python around each
    collective, which grow when the 2 cores are loaded: -12% measured here at load 16, within
    10% on an idle machine (benchmarks/RESULTS.md, `lowband plan`: predicted vs measured)."""
    steps, h, batch, seq = 15, 5, 4, 64
    out = tmp_path / "run"
    argv = ["train", "--workers", "2", "--model", "1m", "--steps", str(steps), "--algo", "diloco",
            "--sync-every", str(h), "--link", "20mbit:20ms", "--batch-size", str(batch),
            "--seq-len", str(seq), "--log-every", "1", "--eval-every", str(steps),
            "--eval-batches", "1", "--ckpt-every", "-1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(x) for x in (out / "metrics" / "rank0.jsonl").read_text().splitlines()]
    at = {m["step"]: m for m in lines if "step" in m and "event" not in m}
    a, b = at[h], at[3 * h]  # whole sync periods, after the first
    wall = (b["wall_time"] - a["wall_time"]) / (b["step"] - a["step"])
    compute = (b["compute_time"] - a["compute_time"]) / (b["step"] - a["step"])
    w = Workload(
        params=MODEL.num_params(), layers=4, dim=128, batch_size=batch, seq_len=seq,
        tokens=steps * 2 * batch * seq, tokens_per_s=batch * seq / compute, model=MODEL,
    )  # fmt: skip
    r = simulate(w, Technique("diloco", sync_every=h), Network(2, LinkSpec.parse("20mbit:20ms")))
    measured = json.loads((out / "summary.json").read_text())["bytes_sent_per_worker"]
    assert r.steps == steps and measured == 8 + r.bytes_per_worker  # + the 8-byte start check
    assert r.step_s == pytest.approx(wall, rel=0.25)


def test_cli_tables_json_plot_and_refusals(tmp_path, capsys):
    js, png = tmp_path / "sim.json", tmp_path / "sim.png"
    argv = ["simulate", "--model", "1m", "--sites", "2x3", "--intra", "10gbit:100us", "--inter",
            "100mbit:40ms", "--tokens-per-s", "20000", "--batch-size", "8", "--seq-len", "128",
            "--tokens", "2e6", "--straggler", "lognormal:0.1", "--failure-rate", "1",
            "--scale", "2,12", "--technique", "ddp", "--technique", "diloco,H=10,bits=4",
            "--json", str(js), "--plot", str(png)]  # fmt: skip
    page = tmp_path / "sim.html"
    assert main([*argv, "--html", str(page)]) == 0
    html = page.read_text()  # the report page: a table per worker count, the plot, assumptions
    assert html.count("<h2>") == 3 + 1 + 2 and html.count("<tr>") == 3 * (1 + 2)
    assert "data:image/png;base64," in html and "Modelled (assumptions)" in html
    text = capsys.readouterr().out
    assert "measured" in text and "modelled" in text and "N=12" in text
    rows = json.loads(js.read_text())["rows"]
    assert {(r["technique"], r["workers"]) for r in rows} == {
        (t, n) for t in ("DDP", "DiLoCo H=10, 4-bit") for n in (2, 6, 12)
    }
    assert png.stat().st_size > 1000
    for bad in (["--straggler", "lognormal:x"], ["--failure-rate", "-1"], ["--scale", "8,a"],
                ["--technique", "diloco,H=0"], ["--sites", "3"], ["--technique", "gossip"]):  # fmt: skip
        assert main(argv[:-4] + bad) == 2  # (the --html run above printed too)
        err = capsys.readouterr().err
        assert err.startswith("lowband: error:") and err.count("\n") == 1


def test_hierarchical_is_inside_then_across_sites():
    """--hierarchical: the technique's collective inside each site (intra link, G workers), then
    across the S sites on G parallel rings (the inter link with G times its bandwidth)."""
    from lowband.plan.cost import sync_costs

    w = _workload(n=12)
    t = Technique("diloco", sync_every=10, bits=4)
    flat = Network.sites(12, 3, INTRA, INTER)
    hier = Network.sites(12, 3, INTRA, INTER, hierarchical=True)
    ((inside, b_in),) = sync_costs(w, t, 4, INTRA)
    wide = LinkSpec(bandwidth_bps=4 * INTER.bandwidth_bps, latency_s=INTER.latency_s)
    ((across, b_across),) = sync_costs(w, t, 3, wide)
    ((secs, nbytes),) = hier.sync(w, t, list(range(12)))
    assert secs == pytest.approx(inside + across) and nbytes == pytest.approx(b_in + b_across / 4)
    assert simulate(w, t, hier).step_s < simulate(w, t, flat).step_s


def test_cli_plays_noloco_and_co2(tmp_path, capsys):
    from lowband.plan.simulate_command import parse_technique

    assert parse_technique("noloco,H=50,g=3") == Technique("noloco", 50, bits=16, group_size=3)
    assert parse_technique("co2,H=48") == Technique("co2", 48, bits=4)
    page, png = tmp_path / "sim.html", tmp_path / "sim.png"
    argv = ["simulate", "--model", "1m", "--workers", "4", "--link", "100mbit:40ms",
            "--tokens-per-s", "20000", "--batch-size", "8", "--seq-len", "128", "--tokens", "4e5",
            "--technique", "noloco,H=10", "--technique", "co2,H=10"]  # fmt: skip
    assert main([*argv, "--html", str(page), "--plot", str(png)]) == 0
    html = page.read_text()
    assert "NoLoCo H=10, g=2, 16-bit" in html and "CO2 H=10, 4-bit" in html
    assert png.stat().st_size > 1000 and "NoLoCo" in capsys.readouterr().out
    for bad in ("noloco,H=10,P=2", "co2,H=10,g=2", "noloco,g=1"):
        assert main([*argv[:-4], "--technique", bad]) == 2
        assert capsys.readouterr().err.startswith("lowband: error:")


def test_cli_takes_a_model_given_by_shape(capsys):
    """--params/--layers/--dim (and --ffn-dim) are the same model flags as `lowband plan`'s."""
    argv = ["simulate", "--params", "1e8", "--layers", "12", "--dim", "768", "--ffn-dim", "3072"]
    argv += ["--tokens-per-s", "100000", "--workers", "8", "--link", "1gbit:10ms"]
    assert main(argv) == 0
    assert "100M parameters" in capsys.readouterr().out


# -- the federated and gossip rules ----------------------------------------------------------------

STAR_AND_GOSSIP = [
    Technique("fedavg", 10),
    Technique("fedprox", 10, options=("--mu", "0.01")),
    Technique("scaffold", 10),
    Technique("scallion", 10, compressor="randk:0.05"),
    Technique("scafcom", 10, compressor="topk:0.05"),
    Technique("admm-nr", 10),
    Technique("dpsgd", 10, topology="ring", bits=16),
    Technique("dpsgd", 10, topology="exponential", bits=32),
    Technique("dfedsam", 10, topology="exponential", bits=16),
    Technique("dfedsam-mgs", 10, topology="ring", bits=16, gossip_steps=4),
]


@pytest.mark.parametrize("technique", STAR_AND_GOSSIP, ids=lambda t: t.label())
def test_federated_and_gossip_without_noise_are_the_plan(technique):
    """Full participation, 6 workers behind one link (every gossip neighbourhood has the plan's
    link): the plan's bytes per worker, step time (DFedSAM: two passes), utilisation and time to
    budget, exactly."""
    w = _workload()
    r = simulate(w, technique, Network(workers=6, link=INTER))
    p = predict(w, technique, 6, INTER)
    assert not r.extrapolated and r.tokens == w.tokens and r.steps == p.steps
    assert r.bytes_per_worker == pytest.approx(r.steps * p.bytes_per_step, rel=1e-12)
    assert r.step_s == pytest.approx(p.step_s, rel=1e-9)
    assert r.utilisation == pytest.approx(p.utilisation, rel=1e-9)
    assert r.time_to_budget_s == pytest.approx(p.time_to_budget_s, rel=1e-9)


def test_partial_participation_draws_as_lowband_train_and_counts_the_plan_bytes():
    """Half the clients per round, drawn by lowband.algorithms.federated.participants (seed,
    round): every round's bytes are star_exchange's for its real senders (the drawn but the
    server), so the run's bytes are their sum, and the plan's expectation M (n - 1) / n within
    the draws' noise; the round waits for its drawn clients and the server only."""
    from lowband.algorithms.federated import participants
    from lowband.plan.cost import star_exchange
    from lowband.plan.simulate import _Run

    n, w = 6, _workload()
    t = Technique("fedavg", 10, participation=0.5)
    r = simulate(w, t, Network(workers=n, link=INTER), seed=3)
    rounds = r.steps // 10
    assert r.tokens == w.tokens and rounds == 2 * 20  # 3 of 6 clients' steps count per round
    drawn = [participants(list(range(n)), 3, 3, k) for k in range(1, rounds + 1)]
    senders = [len([c for c in d if c != 0]) for d in drawn]
    total = sum(star_exchange(w.params, n, t, s, INTER)[1] for s in senders)
    assert r.bytes_per_worker == pytest.approx(total / n, rel=1e-12)
    p = predict(w, t, n, INTER)
    assert r.bytes_per_worker == pytest.approx(r.steps * p.bytes_per_step, rel=0.05)
    assert len(set(map(tuple, drawn))) > 5  # the draw changes with the round
    # one round: a straggler left out of the draw delays no one; a drawn one delays the round
    run = _Run(w, t, Network(workers=n, link=INTER), Straggler(), Failures(), seed=3)
    chosen = run.draw(1, 3)
    assert chosen == set(drawn[0])
    idle = next(c for c in range(1, n) if c not in chosen)
    busy = next(c for c in chosen if c != 0)
    run.advance(10)
    run.clocks[idle] += 1.0
    start, _ = run.start(chosen)
    assert start == pytest.approx(10 * w.compute_s)
    run.clocks[busy] += 2.0
    assert run.arrival(chosen) == pytest.approx(10 * w.compute_s + 2.0)


def test_a_gossip_straggler_slows_its_neighbours_not_the_far_side_of_the_ring():
    """Per-worker clocks: on a ring of 32, rank 5 one second late delays ranks 4 and 6 in one
    gossip step (D-PSGD), two hops each way in two (DFedSAM-MGS, Q = 2), and no one farther."""
    from lowband.plan.simulate_groups import GroupRun

    w = _workload(n=32)
    net = Network(workers=32, link=LinkSpec.parse("100gbit:10us"))
    for t, late in (
        (Technique("dpsgd", 10, bits=16), [4, 5, 6]),
        (Technique("dfedsam-mgs", 10, bits=16, gossip_steps=2), [3, 4, 5, 6, 7]),
    ):
        run = GroupRun(w, t, net, Straggler(), Failures(), seed=0)
        run.advance(10)
        run.clocks[5] += 1.0
        assert run.gossip(list(range(32)), {}, 0) == 32
        tc = 10 * w.compute_s * (2 if t.algo == "dfedsam-mgs" else 1)
        assert [r for r, c in zip(run.ranks, run.clocks) if c > tc + 0.5] == late
        assert run.clocks[20] < tc + 0.01  # the far side of the ring went on


def test_a_failure_in_a_federated_round_is_survived():
    """A client failing during the local steps is left out of its round (no round discarded);
    one failing while the star exchange is on the wire discards that round for everyone, as
    should_commit does; either way the run reaches the budget, the worker heals and rejoins."""
    n, k = 4, 10
    w = _workload(n=n)
    net = Network(workers=n, link=INTER)
    t = Technique("scaffold", k)
    f = Failures(rate_per_hour=0.0, recovery_s=1.0, detect_s=5.0)
    clean = simulate(w, t, net)
    sync = predict(w, t, n, INTER).sync_s
    rnd = k * w.compute_s + sync
    assert clean.wall_s == pytest.approx(20 * rnd)
    for at, discarded in ((rnd + w.compute_s, 0), (rnd + k * w.compute_s + sync / 2, 1)):
        r = simulate(w, t, net, failures=f, fail_at=((at, 2),))
        assert (r.failures, r.discarded_rounds) == (1, discarded)
        assert r.tokens >= w.tokens and not r.stalled and r.heal_s > 0
        assert r.heal_s == pytest.approx(INTER.ideal_time(heal_bytes(w, t), 1))
        assert r.wall_s > clean.wall_s + f.detect_s
    # the server itself (rank 0) failing: the lowest live rank serves the next rounds
    r = simulate(w, t, net, failures=f, fail_at=((rnd + w.compute_s, 0),))
    assert r.tokens >= w.tokens and r.failures == 1


def test_a_gossip_failure_holds_only_its_neighbours():
    from lowband.plan.simulate_groups import GroupRun

    n, w = 8, _workload()
    t = Technique("dpsgd", 10, bits=16)
    f = Failures(rate_per_hour=0.0, recovery_s=1.0, detect_s=5.0)
    run = GroupRun(
        w, t, Network(workers=n, link=INTER), Straggler(), f, seed=0, fail_at=((0.3, 3),)
    )
    run.advance(10)
    assert run.gossip(list(range(n)), {}, 0) == n - 1
    end = dict(zip(run.ranks, run.clocks))
    secs = predict(w, t, n, INTER).sync_s
    assert 3 not in end and run.failed == 1
    assert end[2] == pytest.approx(0.3 + f.detect_s + secs)
    assert end[4] == pytest.approx(0.3 + f.detect_s + secs)
    for r in (0, 1, 5, 6, 7):
        assert end[r] == pytest.approx(10 * w.compute_s + secs)
    r = simulate(w, t, Network(workers=n, link=INTER), failures=f, fail_at=((0.3, 3),))
    assert r.discarded_rounds == 0 and r.tokens >= w.tokens and r.heal_s > 0


@pytest.mark.parametrize("spec", ["ring", "exponential", "torus", "erdos:0.5"])
def test_gossip_neighbours_are_lowband_decentrals(spec):
    from lowband.decentral.topology import parse_topology
    from lowband.plan.simulate import in_neighbours

    for n in (2, 7, 8, 12):
        topo = parse_topology(spec, n, 1)
        assert in_neighbours(spec, n, 1) == [topo.in_neighbours(i) for i in range(n)]


def test_cli_plays_federated_and_gossip_as_the_plan_names_them(tmp_path, capsys):
    from lowband.plan.cost import FEDERATED_CANDIDATES, GOSSIP_CANDIDATES
    from lowband.plan.simulate_command import parse_technique

    for base in (*FEDERATED_CANDIDATES, *GOSSIP_CANDIDATES):
        spec = ",".join(base.flags()[1:2] + ["K=7" if base.algo in ("fedavg", "fedprox",
                        "scaffold", "scallion", "scafcom", "admm-nr") else "H=7"])  # fmt: skip
        if base.algo in ("dpsgd", "dfedsam", "dfedsam-mgs"):
            spec += f",topology={base.topology}"
        assert parse_technique(spec) == dataclasses.replace(base, sync_every=7)
    assert parse_technique("fedavg,K=5,participation=0.25").participation == 0.25
    assert parse_technique("D-PSGD,H=3").label() == "D-PSGD H=3, ring, 16-bit"
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    for name in ("fedavg", "scaffold", "scallion", "scafcom", "admm-nr", "dpsgd", "dfedsam-mgs"):
        assert name in helptext
    page = tmp_path / "sim.html"
    argv = ["simulate", "--model", "1m", "--workers", "4", "--link", "100mbit:40ms",
            "--tokens-per-s", "20000", "--batch-size", "8", "--seq-len", "128", "--tokens", "4e5",
            "--technique", "scaffold,K=10,participation=0.5", "--technique",
            "dfedsam-mgs,H=10,topology=exponential,Q=2"]  # fmt: skip
    assert main([*argv, "--html", str(page)]) == 0
    html = page.read_text()
    assert "SCAFFOLD K=10, 50% of clients" in html and "DFedSAM-MGS H=10, exponential" in html
    for bad in ("fedavg,K=10,topology=ring", "dpsgd,H=10,Q=2", "scafcom,K=2,participation=2"):
        assert main([*argv[:-4], "--technique", bad]) == 2
        assert capsys.readouterr().err.startswith("lowband: error:")
