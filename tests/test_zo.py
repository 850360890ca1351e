"""lowband.zo: seeded perturbations, the one-byte codec, distributed ZO with bit-identical ranks
and log replay. Ranks run as threads (lowband.testing.run_ranks) on Gloo."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lowband.comm import Comm
from lowband.models import ModelConfig, build_model
from lowband.testing import run_ranks
from lowband.zo import (
    ZOLog,
    ZOTrainer,
    apply_update_,
    decode,
    encode,
    noise,
    perturb_,
    perturbed_loss,
    replay,
    seed_for,
    spsa_grad,
    two_point,
)

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)
LR, EPS, WD, RUN_SEED = 1e-3, 1e-3, 0.01, 7


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def loss_fn(model, batch):
    return model.loss(*batch)


def make_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's batch at a step; targets are the constant token 0 (a task ZO can learn fast)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, CFG.vocab_size, (4, 8), generator=gen)
    return tokens, torch.zeros_like(tokens)


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bit_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# -- spsa --------------------------------------------------------------------------------------


def test_noise_is_reproducible_and_order_fixed():
    model = build_model(CFG)
    z1 = [z for _, z in noise(model.parameters(), 3)]
    z2 = [z for _, z in noise(model.parameters(), 3)]
    z3 = [z for _, z in noise(model.parameters(), 4)]
    assert_bit_equal(z1, z2)
    assert not torch.equal(z1[0], z3[0])
    before = params_of(model)
    perturb_(model, 3, 0.5)
    for p, b, z in zip(model.parameters(), before, z1, strict=True):
        torch.testing.assert_close(p.detach(), b + 0.5 * z, rtol=3e-7, atol=1e-8)


@pytest.mark.parametrize("restore", ["copy", "host"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_restore_has_no_drift(restore, dtype):
    """How the bf16 drift is avoided: the exact modes copy theta back (arith drifts, below)."""
    model = build_model(CFG, dtype=dtype)
    before = params_of(model)
    for seed in range(3):
        g = spsa_grad(model, loss_fn, make_batch(0, 0), seed=seed, eps=1e-2, restore=restore)
        assert math.isfinite(g) and g != 0.0
    assert_bit_equal(params_of(model), before)


@pytest.mark.parametrize(("dtype", "eps"), [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_arith_restore_drift(dtype, eps):
    """+eps, -2eps, +eps is not exact; the drift is a few roundings (numbers in spsa.py)."""
    model = build_model(CFG, dtype=dtype)
    before = params_of(model)
    spsa_grad(model, loss_fn, make_batch(0, 0), seed=1, eps=eps, restore="arith")
    unit = torch.finfo(dtype).eps
    moved = 0
    for (p, z), b in zip(noise(model.parameters(), 1), before, strict=True):
        drift = (p.float() - b.float()).abs()
        bound = 2 * unit * (b.float().abs() + 2 * eps * z.abs())
        assert torch.all(drift <= bound)
        moved += int((drift > 0).sum())
    assert moved > 0  # documents that it is not exact


def test_apply_update_matches_textbook_rule():
    model = build_model(CFG)
    before = params_of(model)
    apply_update_(model, seed=9, g=0.5, lr=LR, wd=WD)
    for (p, z), b in zip(noise(model.parameters(), 9), before, strict=True):
        torch.testing.assert_close(p, b - LR * (0.5 * z + WD * b), rtol=3e-7, atol=1e-8)


def test_zo_lowers_the_loss():
    model = build_model(CFG)
    batch = make_batch(0, 0)
    with torch.no_grad():
        start = float(loss_fn(model, batch))
    for step in range(50):
        g = spsa_grad(model, loss_fn, batch, seed=step, eps=EPS)
        apply_update_(model, step, decode(encode(g)), LR)
    with torch.no_grad():
        end = float(loss_fn(model, batch))
    assert end < start - 0.1, (start, end)


# -- codec -------------------------------------------------------------------------------------


def test_codec_round_trip_error():
    rng = random.Random(0)
    bound = math.exp(1 / 32) - 1
    for _ in range(2000):
        g = rng.choice([-1, 1]) * math.exp(rng.uniform(-63 / 16, 63 / 16))
        code = encode(g)
        assert len(code) == 1
        assert abs(decode(code) - g) <= bound * abs(g) * (1 + 1e-12)
        assert len(encode(g, 32)) == 4 and decode(encode(g, 32), 32) == float(torch.tensor(g))


def test_codec_edges():
    assert decode(encode(0.0)) == 0.0 and encode(0.0) == b"\x00"
    assert decode(encode(1e-30)) == pytest.approx(math.exp(-63 / 16))  # clamped, sign kept
    assert decode(encode(-1e30)) == pytest.approx(-math.exp(63 / 16))
    assert decode(encode(-math.inf)) < 0
    assert decode(encode(1e-30, center=-400), center=-400) == pytest.approx(1e-30, rel=0.04)
    with pytest.raises(ValueError):
        encode(math.nan)


# -- distributed -------------------------------------------------------------------------------


def _train(comm, steps: int, bits: int, samples: int = 1, pp: bool = False):
    model = build_model(CFG)
    zo = ZOTrainer(
        model, comm, lr=LR, eps=EPS, wd=WD, bits=bits, seed=RUN_SEED, samples=samples,
        perturb_parallel=pp,
    )  # fmt: skip
    for step in range(steps):
        zo.step(loss_fn, make_batch(zo.group, step), step)
    return params_of(model), zo.log, comm.stats


def _slot_grads(model, groups: int, samples: int, step: int, bits: int):
    """Single process: (seed, decoded g) of every slot at the current parameters, in slot order."""
    out = []
    for grp in range(groups):
        for j in range(samples):
            seed = seed_for(RUN_SEED, step, grp * samples + j)
            g = spsa_grad(model, loss_fn, make_batch(grp, step), seed, EPS)
            out.append((seed, decode(encode(g, bits), bits)))
    return out


def _reference(groups: int, steps: int, bits: int, samples: int = 1) -> list[torch.Tensor]:
    """The textbook step, written out: theta *= 1 - lr wd; theta -= lr/m * g_k z_k, slot order."""
    model = build_model(CFG)
    for step in range(steps):
        gs = _slot_grads(model, groups, samples, step, bits)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 - LR * WD)
            for seed, g in gs:
                for p, z in noise(model.parameters(), seed):
                    p.add_(z, alpha=-LR * g / len(gs))
    return params_of(model)


MODES = [  # (ranks, bits, samples, perturbation parallel): groups = ranks, or ranks / 2 with pp
    (2, 8, 1, False),
    (3, 8, 2, False),
    (3, 32, 1, False),
    (2, 8, 2, True),  # DistZO2 PertP: one pair
    (4, 8, 1, True),  # 2-D: two pairs
    (4, 32, 2, True),
]


@pytest.mark.parametrize(("n", "bits", "samples", "pp"), MODES)
def test_distributed_matches_reference_and_replays(n, bits, samples, pp):
    """Every mode equals the single-process reference bit for bit (why: distributed.py), all ranks
    are identical, and replaying the log reproduces the parameters bit for bit."""
    steps, groups = 3, n // 2 if pp else n
    results = run_ranks(n, _train, steps, bits, samples, pp)
    params0, log0, _ = results[0]
    for params, log, _ in results[1:]:  # all ranks bit-identical, same log
        assert_bit_equal(params, params0)
        assert log.entries == log0.entries
    assert_bit_equal(params0, _reference(groups, steps, bits, samples))
    m = groups * samples
    assert [(e.step, e.slot) for e in log0.entries] == [
        (s, k) for s in range(steps) for k in range(m)
    ]

    # A newcomer with the initial checkpoint and the log (round-tripped through JSON).
    fresh = build_model(CFG)
    assert replay(fresh, ZOLog.from_json(log0.to_json())) == steps - 1
    assert_bit_equal(params_of(fresh), params0)

    # ... or with a mid-run checkpoint: replay from step 2 only.
    mid = build_model(CFG)
    replay(mid, ZOLog(**{**vars(log0), "entries": [e for e in log0.entries if e.step < 2]}))
    replay(mid, log0, from_step=2)
    assert_bit_equal(params_of(mid), params0)


def test_step_is_the_average_of_single_slot_updates():
    """Independent of the slot order and the update code: one 3-rank, 2-sample step moves theta by
    the mean of the six single-slot MeZO updates (apply_update_ on a copy), to fp32 rounding."""
    n, samples = 3, 2
    params, _, _ = run_ranks(n, _train, 1, 32, samples)[0]
    model = build_model(CFG)
    theta = params_of(model)
    deltas = []
    for seed, g in _slot_grads(model, n, samples, 0, 32):
        single = build_model(CFG)
        apply_update_(single, seed, g, LR, WD)
        deltas.append([p.detach() - t for p, t in zip(single.parameters(), theta, strict=True)])
    for k, (p, t) in enumerate(zip(params, theta, strict=True)):
        mean = sum(d[k] for d in deltas) / len(deltas)
        # The distributed step rounds 7 times (decay, 6 adds), each single update twice: a few
        # fp32 ulps of |theta| + the largest single update.
        big = torch.stack([d[k].abs() for d in deltas]).amax(0)
        bound = 8 * torch.finfo(torch.float32).eps * (t.abs() + big)
        assert torch.all((p - t - mean).abs() <= bound)
        assert mean.abs().max() > 1e-6  # the step moved it


@pytest.mark.parametrize(("n", "bits", "samples", "pp"), MODES)
def test_bytes_per_step(n, bits, samples, pp):
    """Each rank contributes samples*k bytes (k = 1 or 4) to one all-gather per step: n*samples*k
    bytes of payload; the ring accounting charges each rank (n-1)*samples*k sent and received.
    Perturbation parallelism adds the pair's fp32 loss swap, 4*samples bytes each way."""
    steps, k = 3, bits // 8

    def body(comm):
        stats = _train(comm, steps, bits, samples, pp)[2]
        return {op: (v.calls, v.bytes_sent, v.bytes_recv) for op, v in stats.ops.items()}

    for ops in run_ranks(n, body):
        per_rank = (n - 1) * samples * k
        digest = 8 * (n - 1)  # the start check: one 8-byte digest per rank, once
        assert ops["all_gather"] == (
            steps + 1,
            steps * per_rank + digest,
            steps * per_rank + digest,
        )
        # Payload: what every rank contributes, summed over ranks = n x samples x k per step.
        assert n * per_rank // (n - 1) == n * samples * k
        if pp:
            assert ops["send"] == (steps, steps * 4 * samples, 0)
            assert ops["recv"] == (steps, 0, steps * 4 * samples)
        assert set(ops) == ({"all_gather", "send", "recv"} if pp else {"all_gather"})


def test_newcomer_joins_at_step_k_by_replay():
    """Two ranks train k steps; a third joins holding only the starting checkpoint and the log,
    replays it (no model transfer), and the three train on: all end bit-identical, and equal to a
    reference that ran 2 groups for k steps and 3 after."""
    k, more = 2, 2
    phase1 = run_ranks(2, _train, k, 8)
    params1, log1, _ = phase1[0]

    def phase2(comm):
        model = build_model(CFG)
        if comm.rank < 2:  # the old ranks keep their parameters
            with torch.no_grad():
                for p, q in zip(model.parameters(), params1, strict=True):
                    p.copy_(q)
            log = ZOLog.from_json(log1.to_json())
        else:  # the newcomer: starting weights + the log
            log = ZOLog.from_json(log1.to_json())
            replay(model, log)
            assert_bit_equal(params_of(model), params1)
        zo = ZOTrainer(model, comm, lr=LR, eps=EPS, wd=WD, bits=8, seed=RUN_SEED, log=log)
        for step in range(k, k + more):
            zo.step(loss_fn, make_batch(zo.group, step), step)
        return params_of(model)

    final = run_ranks(3, phase2)
    for params in final[1:]:
        assert_bit_equal(params, final[0])
    ref = build_model(CFG)
    for step in range(k + more):
        gs = _slot_grads(ref, 2 if step < k else 3, 1, step, 8)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(1.0 - LR * WD)
            for seed, g in gs:
                for p, z in noise(ref.parameters(), seed):
                    p.add_(z, alpha=-LR * g / len(gs))
    assert_bit_equal(final[0], params_of(ref))


def test_world_of_one_needs_no_group():
    params, log, stats = run_ranks(1, _train, 2, 8)[0]
    assert stats.ops["all_gather"].bytes_sent == 0 and len(log.entries) == 2
    assert_bit_equal(params, _reference(1, 2, 8))


def test_trainer_rejects_bad_input():
    for kw in ({"bits": 16}, {"samples": 0}, {"restore": "arith"}):
        with pytest.raises(ValueError):
            ZOTrainer(build_model(CFG), Comm(None), lr=LR, eps=EPS, **kw)
    with pytest.raises(ValueError, match="even"):
        ZOTrainer(build_model(CFG), Comm(None), lr=LR, eps=EPS, perturb_parallel=True)


@pytest.mark.parametrize("restore", ["copy", "host"])
def test_perturbed_loss_restores_exactly_and_pairs_equal_spsa(restore):
    model = build_model(CFG)
    before = params_of(model)
    batch = make_batch(0, 0)
    lp = perturbed_loss(model, loss_fn, batch, 4, EPS, restore=restore)
    lm = perturbed_loss(model, loss_fn, batch, 4, -EPS, restore=restore)
    assert_bit_equal(params_of(model), before)
    assert spsa_grad(model, loss_fn, batch, 4, EPS, restore=restore) == two_point(lp, lm, EPS)
    assert lp != lm
