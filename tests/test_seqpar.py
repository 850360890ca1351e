"""Sequence-parallel attention against single-process attention on the full sequence.

Every variant (ring, TokenRing, Ulysses, hybrid) on 2 and 4 Gloo ranks (threads): outputs AND
dq, dk, dv equal the reference for causal and non-causal masks, GQA, padded lengths, packed
sequences and fully masked rows; the model with sequence parallel equals the unsharded model's
loss and gradients (also with data parallel across cp groups); the balancer keeps capacity, is
deterministic and beats round-robin.
"""

import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from lowband.algorithms import DDP
from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.models import ModelConfig, build_model
from lowband.seqpar import (
    Layout,
    Mask,
    hybrid_attention,
    plan,
    reference_attention,
    ring_attention,
    token_ring_attention,
    ulysses_attention,
)
from lowband.seqpar import attention as attn_mod
from lowband.seqpar import blocks as blocks_mod
from lowband.seqpar.balance import balance, seq_cost, shard_tokens
from lowband.seqpar.blocks import _math_backward, _math_forward, merge_
from lowband.seqpar.train import SeqParallel
from lowband.testing import gloo_groups, run_ranks

torch.set_num_threads(1)

# (name, H, K, S, causal, cu_seqlens, seq_len): S is the full length drawn, seq_len the valid one
CASES = [
    ("causal-mha", 4, 4, 16, True, None, None),
    ("noncausal-gqa", 8, 2, 16, False, None, None),
    ("causal-gqa-padded", 8, 2, 13, True, None, 13),
    ("noncausal-padded", 4, 4, 11, False, None, 11),
    ("packed-causal", 4, 2, 24, True, [0, 5, 13, 20, 24], None),
    ("packed-masked-rows", 4, 2, 21, False, [0, 7, 7, 17], 21),  # rows 17..20 see nothing
    ("packed-masked-causal", 8, 2, 19, True, [0, 2, 11], 19),
    ("one-seq-then-masked", 4, 2, 13, True, [0, 9], 13),  # found by the random test below
]
LAYOUT = {"ring": "zigzag", "tokenring": "zigzag", "ulysses": "contiguous", "hybrid": "hybrid"}


def _tensors(H, K, S, seed):
    g = torch.Generator().manual_seed(seed)
    B, D = 2, 8
    q, dout = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(B, K, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


def _references():
    out = {}
    for i, (name, H, K, S, causal, cu, seq_len) in enumerate(CASES):
        q, k, v, dout = _tensors(H, K, S, i)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*leaves, causal=causal, cu_seqlens=cu, seq_len=seq_len)
        grads = torch.autograd.grad(ref, leaves, dout)
        out[name] = ((q, k, v, dout), (ref.detach(), *grads))
    return out


def _sharded(comm: Comm, variants, world, refs, extra=None):
    """On one rank: every case x variant; returns {(case, variant): max abs error vs ref}."""
    errors = {}
    if "hybrid" in variants:  # each group is made once per rank, before any case runs
        ring_rank, u = divmod(comm.rank, 2)
        uc, rc = Comm(extra["u"][ring_rank](u)), Comm(extra["r"][u](ring_rank))
    for name, _, _, _, causal, cu, seq_len in CASES:
        (q, k, v, dout), expected = refs[name]
        for variant in variants:
            lay = Layout(LAYOUT[variant], world, 2 if variant == "hybrid" else 1)
            local = [lay.shard(t, 2, comm.rank).requires_grad_() for t in (q, k, v)]
            kw = dict(causal=causal, cu_seqlens=cu, seq_len=seq_len)
            if variant == "hybrid":
                out = hybrid_attention(*local, uc, rc, **kw)
            else:
                fn = {"ring": ring_attention, "tokenring": token_ring_attention}.get(
                    variant, ulysses_attention
                )
                out = fn(*local, comm, **kw)
            got = (out, *torch.autograd.grad(out, local, lay.shard(dout, 2, comm.rank)))
            assert all(torch.isfinite(t).all() for t in got), (name, variant)
            errors[(name, variant)] = max(
                (a - lay.shard(b, 2, comm.rank)).abs().max().item() for a, b in zip(got, expected)
            )
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_every_variant_matches_full_attention(world):
    refs = _references()
    variants = ["ring", "tokenring", "ulysses"] + (["hybrid"] if world == 4 else [])
    extra = {
        "u": [gloo_groups(2, prefix=f"u{i}") for i in range(world // 2)],
        "r": [gloo_groups(world // 2, prefix=f"r{i}") for i in range(2)],
    }
    results = run_ranks(world, _sharded, variants, world, refs, extra)
    for rank, errors in enumerate(results):
        assert len(errors) == len(CASES) * len(variants)
        for key, err in errors.items():
            assert err < 1e-10, (rank, key, err)


def _random_worker(comm: Comm, cases):
    errors = []
    for variant, layout, (q, k, v, dout), kw, expected in cases:
        lay = Layout(layout, comm.size)
        local = [lay.shard(t, 2, comm.rank).requires_grad_() for t in (q, k, v)]
        fn = {"ring": ring_attention, "tokenring": token_ring_attention}.get(
            variant, ulysses_attention
        )
        out = fn(*local, comm, layout=layout, **kw)
        got = (out, *torch.autograd.grad(out, local, lay.shard(dout, 2, comm.rank)))
        errors.append(
            max((a - lay.shard(b, 2, comm.rank)).abs().max().item() for a, b in zip(got, expected))
        )
    return errors


def test_random_masks_on_three_ranks():
    """Random lengths, packings (also ending before seq_len) and layouts on an odd rank count."""
    rng = torch.Generator().manual_seed(5)
    cases = []
    for i in range(24):
        S = int(torch.randint(1, 30, (), generator=rng))
        cuts = sorted(
            torch.randint(
                0, S + 1, (int(torch.randint(0, 4, (), generator=rng)),), generator=rng
            ).tolist()
        )
        causal = bool(i % 3)
        variant = ("ring", "tokenring", "ulysses")[i % 3]
        layout = ("zigzag", "contiguous")[(i // 3) % 2]
        q, k, v, dout = _tensors(6, 3, S, 100 + i)
        kw = dict(causal=causal, cu_seqlens=[0, *cuts] if i % 4 else None, seq_len=S)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*leaves, **kw)
        expected = (ref.detach(), *torch.autograd.grad(ref, leaves, dout))
        cases.append((variant, layout, (q, k, v, dout), kw, expected))
    for rank, errors in enumerate(run_ranks(3, _random_worker, cases)):
        assert len(errors) == 24 and max(errors) < 1e-10, (rank, errors)


def test_fully_masked_rows_are_zero_and_padding_gets_no_gradient():
    refs = _references()
    (_, _, _, _), (ref, gq, gk, gv) = refs["packed-masked-rows"]
    assert ref[:, :, 17:].abs().max() == 0 and ref[:, :, :17].abs().min() > 0
    assert gk[:, :, 17:].abs().max() == 0 and gq[:, :, 17:].abs().max() == 0


def _order_worker(comm):
    q, k, v, _ = _tensors(4, 2, 16, 0)
    for fn in (ring_attention, token_ring_attention):
        fn(*(Layout("zigzag", 2).shard(t, 2, comm.rank) for t in (q, k, v)), comm)


def test_next_transfer_is_posted_before_the_current_block(monkeypatch):
    events: list[tuple[str, str]] = []
    real_exchange, real_block = attn_mod.exchange, attn_mod.block_forward

    def exchange(comm, sends, recvs):
        events.append((threading.current_thread().name, "x"))
        return real_exchange(comm, sends, recvs)

    def block(*a):
        events.append((threading.current_thread().name, "c"))
        return real_block(*a)

    monkeypatch.setattr(attn_mod, "exchange", exchange)
    monkeypatch.setattr(attn_mod, "block_forward", block)
    run_ranks(2, _order_worker)
    for thread in {t for t, _ in events}:
        seq = "".join(e for t, e in events if t == thread)
        # ring: post (x), own block (c), next block (c); TokenRing: post (x), own block (c),
        # next block (c), then the partial result goes back (x)
        assert seq == "xcc" + "xccx", seq


def test_plans_use_one_fused_call_per_block_without_packing():
    lay, S = Layout("zigzag", 4), 64
    mask = Mask.make(True, S)
    pieces = [lay.pieces(r, S) for r in range(4)]
    for r in range(4):
        assert plan(pieces[r], pieces[r], mask) == ((0, 16, 0, 16, True),)
        for j in range(4):
            if j != r:
                (call,) = plan(pieces[r], pieces[j], mask)
                assert not call[4] and (call[1] - call[0]) * (call[3] - call[2]) == 8 * 16


def test_bad_shapes_and_heads_raise_config_error():
    four = types.SimpleNamespace(size=4, rank=0)  # no group: the local checks alone (check=False)
    q, k, v = torch.zeros(1, 6, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)
    with pytest.raises(ConfigError, match="query heads 6"):
        ulysses_attention(q, k, v, four, check=False)
    q = torch.zeros(1, 12, 4, 8)
    k = v = torch.zeros(1, 3, 4, 8)
    with pytest.raises(ConfigError, match="kv heads 3"):
        ulysses_attention(q, k, v, four, check=False)
    with pytest.raises(ConfigError, match="pads to"):
        ring_attention(q, k, v, four, seq_len=7, check=False)
    with pytest.raises(ConfigError, match="multiple of 8"):
        ring_attention(
            torch.zeros(1, 2, 3, 8),
            torch.zeros(1, 2, 3, 8),
            torch.zeros(1, 2, 3, 8),
            four,
            check=False,
        )
    with pytest.raises(ConfigError, match="cu_seqlens"):
        ring_attention(q, k, v, four, cu_seqlens=[0, 9, 5], check=False)


def test_merge_of_two_empty_rows_stays_finite():
    out, lse = torch.zeros(1, 1, 2, 4), torch.full((1, 1, 2), -torch.inf)
    merge_(out, lse, torch.ones(1, 1, 2, 4), torch.tensor([[[-torch.inf, 0.0]]]))
    assert torch.isfinite(out).all() and out[0, 0, 0].abs().max() == 0 and out[0, 0, 1].eq(1).all()
    assert lse[0, 0, 0] == -torch.inf and lse[0, 0, 1] == 0


# -- the model ---------------------------------------------------------------------------------

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)


def _batch(seed, B=2, L=16):
    t = torch.randint(0, CFG.vocab_size, (B, L + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def _model_worker(comm: Comm, variant, cp, extra):
    dp_rank, cp_rank = divmod(comm.rank, cp)
    cp_comm = Comm(extra["cp"][dp_rank](cp_rank))
    uc = rc = None
    if variant == "hybrid":
        ring_rank, u = divmod(cp_rank, 2)
        uc, rc = Comm(extra["u"][ring_rank](u)), Comm(extra["r"][u](ring_rank))
    sp = SeqParallel(
        variant, cp_comm, dp_rank=dp_rank, dp_size=comm.size // cp, ulysses_comm=uc, ring_comm=rc
    )
    model = build_model(CFG, seed=3, attn_fn=sp.attn_fn).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    algo = DDP(model, opt, comm)  # averages over the whole world: cp and dp ranks
    loss = sp.loss(model, *_batch(dp_rank))
    loss.backward()
    algo.sync_gradients()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "variant,world,cp",
    [("ring", 2, 2), ("tokenring", 2, 2), ("ulysses", 2, 2), ("hybrid", 4, 4), ("ring", 4, 2)],
)
def test_model_with_sequence_parallel_equals_unsharded(variant, world, cp):
    extra = {
        "cp": [gloo_groups(cp, prefix=f"cp{i}") for i in range(world // cp)],
        "u": [gloo_groups(2, prefix=f"u{i}") for i in range(2)],
        "r": [gloo_groups(2, prefix=f"r{i}") for i in range(2)],
    }
    results = run_ranks(world, _model_worker, variant, cp, extra)
    ref = build_model(CFG, seed=3).double()
    batches = [_batch(d) for d in range(world // cp)]
    losses = [ref.loss(x, y) for x, y in batches]
    (sum(losses) / len(losses)).backward()
    for rank, (loss, grads) in enumerate(results):
        # model.loss takes its cross entropy in fp32, so agreement is to fp32 rounding
        assert loss == pytest.approx(losses[rank // cp].item(), rel=1e-6)
        for g, p in zip(grads, ref.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


# -- the balancer ------------------------------------------------------------------------------


def _skewed(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [int(2 ** (10 + 7 * torch.rand((), generator=g).item())) for _ in range(n)]


def test_balancer_keeps_capacity_and_is_deterministic():
    lengths = _skewed(20, 0)
    capacity = 80 * 1024
    rep = balance(lengths, 8, capacity)
    assert max(rep.balanced.tokens) <= capacity
    assert rep.balanced.groups == balance(list(lengths), 8, capacity).balanced.groups
    assert any(len(g) > 1 for g in rep.balanced.groups)  # the costliest are spread over groups
    per_rank, loads = [0] * 8, [0.0] * 8
    for n, g in zip(lengths, rep.balanced.groups):
        assert g == tuple(range(g[0], g[0] + len(g))) and g[0] % len(g) == 0  # aligned block
        for r in g:
            per_rank[r] += shard_tokens(n, len(g))
            loads[r] += seq_cost(n) / len(g)
    assert per_rank == rep.balanced.tokens
    assert loads == pytest.approx(rep.balanced.loads)
    # a sequence above the capacity is split over the smallest group that holds it
    rep = balance([100_000, 60_000, 60_000], 4, 64 * 1024, a=0.0)
    assert len(rep.balanced.groups[0]) == 2 and max(rep.balanced.tokens) <= 64 * 1024


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balancer_beats_round_robin_on_skewed_lengths(seed):
    lengths = _skewed(32, seed)
    rep = balance(lengths, 8, 160 * 1024)
    assert rep.balanced.max_load < 0.8 * rep.naive.max_load, rep.summary()
    assert rep.balanced.imbalance < rep.naive.imbalance


def test_balancer_rejects_what_cannot_fit():
    with pytest.raises(ConfigError, match="does not fit"):
        balance([1000, 50_000], 4, 10_000)
    with pytest.raises(ConfigError, match="does not fit"):
        balance([9000] * 5, 4, 10_000)  # each fits a rank, not all of them together


# -- the benchmark scripts, in their CPU smoke mode (2 Gloo processes) -------------------------

ROOT = Path(__file__).resolve().parent.parent


def _smoke(script: str, out: Path) -> tuple[str, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, [json.loads(line) for line in out.read_text().splitlines()]


def test_throughput_benchmark_smoke(tmp_path):
    stdout, rows = _smoke("seqpar_throughput.py", tmp_path / "t.jsonl")
    for S in (64, 96):
        got = {r["variant"]: r for r in rows if r["seq_len"] == S}
        assert set(got) == {"single", "ring", "tokenring", "ulysses", "hybrid", "torch_cp"}
        for v in ("single", "ring", "tokenring", "ulysses", "hybrid"):
            assert got[v]["tflops_per_gpu"] > 0 and "error" not in got[v], got[v]
        for v in ("ring", "tokenring", "ulysses", "hybrid"):
            assert got[v]["check_rel_err"] < 1e-5 and got[v]["check_ok"] and got[v]["gpus"] == 2
        assert got["torch_cp"]["error"].startswith("RuntimeError: skipped on CPU")
    assert "skipped on CPU" in stdout and "| 96 | hybrid | math |" in stdout


def test_balance_benchmark_smoke(tmp_path):
    stdout, rows = _smoke("seqpar_balance.py", tmp_path / "b.jsonl")
    naive, balanced = rows
    assert (naive["placement"], balanced["placement"]) == ("naive", "balanced")
    assert balanced["model_max_cost"] <= naive["model_max_cost"]
    assert balanced["max_tokens_per_rank"] <= balanced["capacity"]
    assert naive["step_seconds"] > 0 and balanced["step_seconds"] > 0
    assert "| balanced |" in stdout


# -- lowband train --seq-parallel --------------------------------------------------------------


def test_train_with_sequence_parallel_end_to_end(tmp_path):
    from lowband.cli import main

    out = tmp_path / "run"
    flags = ["--workers", "2", "--seq-parallel", "ring", "--cp", "2", "--steps", "2"]
    flags += ["--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--ckpt-every", "-1"]
    assert main(["train", "--out", str(out), *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the ring's p2p transfers went through the run's Comm stats, next to DDP's all-reduce
    assert summary["bytes_by_op"]["send"] > 0 and summary["bytes_by_op"]["all_reduce"] > 0
    assert summary["final_eval_loss"] == summary["final_eval_loss"]  # not NaN
    assert summary["tokens"] == 2 * 2 * 32  # steps x batch x seq_len x ONE data-parallel group


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--cp", "2"], "need --seq-parallel"),
        (["--seq-parallel", "ring", "--cp", "3"], "divide --workers"),
        (["--seq-parallel", "ring", "--cp", "2", "--algo", "diloco"], "--algo ddp"),
        (["--seq-parallel", "zigzag", "--cp", "2"], "unknown --seq-parallel"),
        (["--seq-parallel", "ring", "--cp", "4", "--seq-len", "36"], "multiple of 8"),
        (["--seq-parallel", "ulysses", "--cp", "4", "--model", "10m"], "Ulysses degree 4"),
        (["--seq-parallel", "ring", "--cp", "2", "--cp-ulysses", "2"], "hybrid only"),
    ],
)
def test_train_rejects_impossible_sequence_parallel_flags(tmp_path, capsys, flags, message):
    from lowband.cli import main

    assert main(["train", "--workers", "4", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_balancer_on_random_inputs_keeps_capacity_and_never_loses_to_round_robin():
    g = torch.Generator().manual_seed(0)
    placed = 0
    for _ in range(300):
        ranks = int(torch.randint(1, 9, (), generator=g))
        cap = int(torch.randint(10, 5000, (), generator=g))
        n = int(torch.randint(1, 21, (), generator=g))
        lengths = torch.randint(1, 2 * cap, (n,), generator=g).tolist()
        try:
            rep = balance(lengths, ranks, cap, a=float(torch.rand((), generator=g)), b=100.0)
        except ConfigError:
            continue
        placed += 1
        assert max(rep.balanced.tokens) <= cap
        if max(rep.naive.tokens) <= cap:
            assert rep.balanced.max_load <= rep.naive.max_load * (1 + 1e-12)
    assert placed > 50


class _FakeFusedOps:
    """The aten SDPA ops' signatures and return layouts, computed by the math path on CPU, so
    the glue around the fused kernels (GQA repeat/fold, LSE shapes, saved aux) is tested here."""

    @staticmethod
    def _scaled_dot_product_cudnn_attention(q, k, v, bias, lse_flag, p, causal, dbg, *, scale):
        out, lse = _math_forward(q, k, v, causal, scale)
        e = torch.empty(0)
        return out, lse.unsqueeze(-1), e, e, q.shape[2], k.shape[2], e, e, e

    @staticmethod
    def _scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse, seed, off, bias, cq, ck, mq, mk, p, causal, *, scale
    ):
        assert lse.shape == (*q.shape[:3], 1) and mq == q.shape[2] and mk == k.shape[2]
        return _math_backward(do, q, k, v, out, lse[..., 0], causal, scale)

    @staticmethod
    def _scaled_dot_product_flash_attention(q, k, v, p, causal, dbg, *, scale):
        out, lse = _math_forward(q, k, v, causal, scale)
        e = torch.empty(0)
        return out, lse, e, e, q.shape[2], k.shape[2], e, e, e

    @staticmethod
    def _scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, cq, ck, mq, mk, p, causal, seed, off, *, scale
    ):
        assert lse.shape == q.shape[:3] and k.shape[1] == q.shape[1]  # kv repeated to H
        return _math_backward(do, q, k, v, out, lse, causal, scale)


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_fused_kernel_glue_with_stand_in_ops(monkeypatch, backend):
    fake = types.SimpleNamespace(
        **{n: getattr(_FakeFusedOps, n) for n in dir(_FakeFusedOps) if n.startswith("_scaled")}
    )
    monkeypatch.setattr(blocks_mod, "aten", fake)
    (q, k, v, dout), expected = _references()["packed-causal"]  # GQA 4/2, packed, causal
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = Mask.make(True, q.shape[2], [0, 5, 13, 20, 24])
    lay = Layout("zigzag", 1)
    out = attn_mod._Ring.apply(*leaves, Comm(None), (lay.pieces(0, 24),), mask, None, backend)
    got = (out, *torch.autograd.grad(out, leaves, dout))
    for a, b in zip(got, expected):  # fused kernels' LSEs are fp32, hence not 1e-10
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
