"""CO2 against references: the synchronous and one-round-delayed rules simulated in one process,
an instrumented check of which average each outer step applies, clipping, the staleness penalty,
overlap on an emulated link, bit-identical replicas, a dead peer, resume with a result in flight."""

import copy
import threading
import time

import pytest
import torch
from outer_helpers import CFG, B, L, batch, flat, inner_step, make, one_intra_op_thread, train  # noqa: F401

from lowband.algorithms.co2 import CO2, co2_outer_step, staleness_penalty
from lowband.comm import Comm, LinkSpec, get_codec
from lowband.comm.quantized import quantized_all_reduce_bytes
from lowband.errors import ConfigError
from lowband.testing import gloo_groups, run_ranks


# -- the rule, simulated in one process --------------------------------------------------------------
def textbook_co2(n, steps, H, *, delay, beta, lr, lam, clip, gap_penalty):
    """CO2 as the paper writes it: m <- beta m + (theta_old - theta_bar)/lambda with theta_bar the
    average of round r (delay 0) or round r-1 (delay 1; theta_old itself at round 1)."""
    models, opts = zip(*[make() for _ in range(n)])
    sizes = [p.numel() for p in models[0].parameters()]
    theta_old = flat(models[0]).clone()
    momentum = torch.zeros_like(theta_old)
    in_flight = None  # (average, start) of the round whose average is still on the wire
    for step in range(steps):
        for r in range(n):
            inner_step(models[r], opts[r], r, step)
        if (step + 1) % H:
            continue
        average = torch.stack([flat(m) for m in models]).mean(0)
        if delay == 0:
            theta_bar, start = average, theta_old.clone()
        else:
            theta_bar, start = in_flight or (theta_old.clone(), theta_old.clone())
            in_flight = (average, theta_old.clone())
        lam_ = staleness_penalty(theta_old - start, start - theta_bar, sizes, lam)
        co2_outer_step(
            theta_old,
            momentum,
            theta_bar,
            beta=beta,
            lr=lr,
            lam=lam_ if gap_penalty else lam,
            clip=clip,
        )
        for m in models:
            torch.nn.utils.vector_to_parameters(theta_old.clone(), m.parameters())
    return theta_old


@pytest.mark.parametrize(
    "n, delay, clip, gap_penalty",
    [
        (1, 0, 1.0, False),
        (3, 0, 3e-3, False),
        (1, 1, 1.0, False),
        (3, 1, 3e-3, False),
        (3, 1, None, True),
    ],
)
def test_co2_equals_the_textbook_rule(n, delay, clip, gap_penalty):
    H, steps = 3, 12
    kw = dict(beta=0.5, lr=0.8, lam=1.5, clip=clip, gap_penalty=gap_penalty)
    got = run_ranks(
        n,
        lambda c: flat(
            train(
                c,
                lambda m, o, c: CO2(
                    m,
                    o,
                    c,
                    sync_every=H,
                    outer_momentum=kw["beta"],
                    outer_lr=kw["lr"],
                    co2_lambda=kw["lam"],
                    co2_clip=clip,
                    co2_gap_penalty=gap_penalty,
                    co2_delay=delay,
                ),
                steps,
            )[0]
        ),
    )
    ref = textbook_co2(n, steps, H, delay=delay, **kw)
    for g in got:
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(g, got[0])  # theta_old is bit-identical on every worker


def test_delay1_applies_exactly_the_previous_rounds_average():
    """beta 0, eta 1, lambda 1, no clip: theta_old <- theta_bar, so the weights after the outer step
    of round r ARE the average of round r-1's local weights (round 0: the start)."""
    n, H, rounds = 3, 2, 4

    def body(c):
        model, opt = make()
        algo = CO2(
            model,
            opt,
            c,
            sync_every=H,
            outer_momentum=0.0,
            outer_lr=1.0,
            co2_lambda=1.0,
            co2_clip=None,
        )
        start, before, after = flat(model).clone(), [], []
        for step in range(H * rounds):
            inner_step(model, opt, c.rank, step)
            if (step + 1) % H == 0:
                before.append(flat(model).clone())
            algo.step()
            if (step + 1) % H == 0:
                after.append(flat(model).clone())
        algo.close()
        return start, before, after, algo.applied

    out = run_ranks(n, body)
    start = out[0][0]
    averages = [torch.stack([o[1][k] for o in out]).mean(0) for k in range(rounds)]
    for _, _, after, applied in out:
        assert applied == [(H, None)] + [((r + 1) * H, r) for r in range(1, rounds)]
        torch.testing.assert_close(after[0], start, rtol=0, atol=0)  # nothing landed yet
        for r in range(1, rounds):
            torch.testing.assert_close(after[r], averages[r - 1], rtol=1e-6, atol=1e-7)
            assert not torch.allclose(after[r], averages[r], rtol=1e-4, atol=1e-5)


# -- clipping and the staleness penalty --------------------------------------------------------------
def test_clipping_really_bounds_the_momentum():
    theta_old, theta_bar = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-4.0, 0.5, 3.0])
    for clip, expected in [
        (1.0, [1.0, 0.5, -1.0]),
        (None, [5.0, 0.5, -2.0]),
        (0, [5.0, 0.5, -2.0]),
    ]:
        t, m = theta_old.clone(), torch.zeros(3)
        co2_outer_step(t, m, theta_bar, beta=0.5, lr=0.5, lam=1.0, clip=clip)
        assert m.tolist() == expected
        assert torch.equal(t, theta_old - 0.5 * m)  # the clipped momentum is the one applied


@pytest.mark.parametrize("clip", [1e-3, None])
def test_clipping_in_training(clip):
    def body(c):
        _, algo = train(
            c, lambda m, o, c: CO2(m, o, c, sync_every=3, co2_clip=clip, co2_delay=0), 6
        )
        return algo.momentum.abs().max().item()

    peak = max(run_ranks(2, body))
    if clip:
        assert peak == pytest.approx(clip)  # reached, never exceeded
    else:
        assert peak > 1e-3  # the same run without clipping goes past it


def test_staleness_penalty_never_lets_the_gap_enlarge_an_update():
    torch.manual_seed(0)
    sizes = [5, 7, 3]
    gap, grad = torch.randn(15) * 3, torch.randn(15)
    gap[12:] = 0  # last tensor: no gap
    lam = staleness_penalty(gap, grad, sizes, lam=2.0)
    for s, g, lk in zip(gap.split(sizes), grad.split(sizes), lam.split(sizes)):
        assert torch.all(lk == lk[0])  # one lambda per tensor
        assert ((s + g) / lk).norm() <= g.norm() / 2.0 * (1 + 1e-6)
    assert torch.all(lam[12:] == 2.0)
    assert torch.all(staleness_penalty(torch.zeros(15), grad, sizes, lam=1.5) == 1.5)


# -- overlap, bytes, replicas, failures, resume, settings ----------------------------------------------
def test_the_reduction_runs_behind_the_next_rounds_compute():
    link = LinkSpec.parse("10mbit:100ms")  # one reduction: ~0.3 s on the wire

    def body(c):
        model, opt = make()
        algo = CO2(model, opt, c, sync_every=4, co2_delay=1)
        in_flight = []
        for step in range(8):
            inner_step(model, opt, c.rank, step)
            if algo._pending is not None and hasattr(algo._pending[1], "done"):
                in_flight.append(not algo._pending[1].done())
            time.sleep(0.12)  # an inner step's compute: 0.48 s a round
            algo.step()
        exposed = c.stats.seconds  # before close(), which waits for the last round's reduction
        algo.close()
        return any(in_flight), exposed, c.stats.background_seconds

    for in_flight, exposed, background in run_ranks(2, body, link=link):
        assert in_flight and background > 0.4  # two reductions spent their time in the background
        assert exposed < 0.25  # ... not in front of the loop (0.10 s measured, the setup's digest)


@pytest.mark.parametrize("bits", [32, 4])
def test_replicas_identical_after_every_outer_step_and_bytes(bits):
    """Divergence max_r ||theta_r - mean|| / ||mean|| is exactly 0 after every outer step: every
    worker decodes the same bytes of the same average, so theta_old is bit-identical everywhere."""
    n, H, rounds = 4, 2, 10

    def body(c):
        model, opt = make()
        algo = CO2(model, opt, c, sync_every=H, bits=bits)
        snaps = []
        for step in range(H * rounds):
            inner_step(model, opt, c.rank, step)
            algo.step()
            if (step + 1) % H == 0:
                snaps.append(flat(model).clone())
        algo.close()
        return snaps, algo.peak_sync_bytes, algo.theta_old.numel(), c.stats.by_op()

    out = run_ranks(n, body)
    for snaps, peak, numel, ops in out:
        assert all(torch.equal(s, s0) for s, s0 in zip(snaps, out[0][0]))
        per_round = quantized_all_reduce_bytes(numel, n, get_codec(bits))
        assert peak == per_round
        sent = ops["all_to_all"]["bytes_sent"] + ops["all_gather"]["bytes_sent"] - (n - 1) * 8
        assert sent == rounds * per_round  # all rounds reduced (the last drained by close)
    assert not torch.equal(out[0][0][0], out[0][0][-1])


def test_a_dead_peer_raises_the_group_timeout_instead_of_hanging():
    make_group = gloo_groups(2, timeout_s=1.0)
    errors: dict[int, BaseException] = {}

    def body(rank):
        comm = Comm(make_group(rank))
        model, opt = make()
        algo = CO2(model, opt, comm, sync_every=1)
        if rank == 1:  # alive but never reduces: a hung peer
            time.sleep(1.5)
            return
        try:
            for step in range(2):  # round 1 submits; round 2 waits for it
                inner_step(model, opt, rank, step)
                algo.step()
        except RuntimeError as e:
            errors[rank] = e
        finally:
            algo._reducer.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    threads[0].join(10)
    assert not threads[0].is_alive() and time.perf_counter() - t0 < 5
    assert "Timed out" in str(errors[0])
    threads[1].join(10)


def test_state_dict_keeps_the_in_flight_average_and_resumes_bit_identically():
    n, H = 3, 3

    def body(c):
        make_algo = lambda m, o, c: CO2(m, o, c, sync_every=H, co2_gap_penalty=True)
        model, opt = make()
        algo = make_algo(model, opt, c)
        for step in range(4 * H):
            if step == 2 * H:  # round 2's average is in flight
                saved = copy.deepcopy((model.state_dict(), opt.state_dict(), algo.state_dict()))
            inner_step(model, opt, c.rank, step)
            algo.step()
        algo.close()
        assert saved[2]["pending"]["round"] == 2
        resumed, algo2 = train(c, make_algo, 4 * H, start=2 * H, state=saved)
        assert algo2.applied == [(3 * H, 2), (4 * H, 3)] and algo2.outer_steps == 4
        return flat(model), flat(resumed)

    for straight, resumed in run_ranks(n, body):
        assert torch.equal(straight, resumed)


def test_bad_settings():
    model, opt = make()
    with pytest.raises(ConfigError, match="co2_delay"):
        CO2(model, opt, Comm(None), co2_delay=2)
    with pytest.raises(ConfigError, match="co2_lambda"):
        CO2(model, opt, Comm(None), co2_lambda=0.0)
    with pytest.raises(ConfigError, match="co2_clip"):
        CO2(model, opt, Comm(None), co2_clip=-1.0)
    with pytest.raises(ConfigError, match="beta"):
        CO2(model, opt, Comm(None), outer_momentum=1.0)
    with pytest.raises(ConfigError, match="sync_every"):
        CO2(model, opt, Comm(None), sync_every=0)
