"""DDP against the single-process reference: N workers == one process on the concatenated batch."""

import pytest
import torch

from lowband.algorithms import DDP
from lowband.comm import Comm
from lowband.models import ModelConfig, build_model
from lowband.testing import run_ranks

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)
B, L, STEPS = 2, 16, 4


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    t = torch.randint(0, CFG.vocab_size, (B, L + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def make_opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def ddp_worker(comm: Comm, use_context_manager: bool):
    torch.manual_seed(comm.rank)  # must not matter: DDP broadcasts rank 0's parameters
    model = build_model(CFG, seed=7)
    if comm.rank != 0:
        with torch.no_grad():  # a worker that starts different is made identical by the broadcast
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    opt = make_opt(model)
    grads = []
    algo = DDP(model, opt, comm, bucket_mb=0.01)  # small buckets: several all-reduces per step
    if use_context_manager:
        with algo:
            for step in range(STEPS):
                x, y = batch(comm.rank, step)
                model.loss(x, y).backward()
                opt.step()
                opt.zero_grad()
    else:
        for step in range(STEPS):
            x, y = batch(comm.rank, step)
            model.loss(x, y).backward()
            algo.sync_gradients()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
            algo.step()
    return [p.detach().clone() for p in model.parameters()], grads, len(algo.buckets)


def reference(n: int):
    model = build_model(CFG, seed=7)
    opt = make_opt(model)
    grads = []
    for step in range(STEPS):
        xs, ys = zip(*(batch(r, step) for r in range(n)))
        model.loss(torch.cat(xs), torch.cat(ys)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], grads


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ddp_equals_one_process_on_the_concatenated_batch(n):
    ref_params, ref_grads = reference(n)
    results = run_ranks(n, ddp_worker, use_context_manager=False)
    for params, grads, n_buckets in results:
        assert n_buckets > 1
        for step in range(STEPS):  # gradients, step by step
            for g, rg in zip(grads[step], ref_grads[step]):
                torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)
        # And the parameters they lead to. Adam divides by sqrt(v): where a gradient is ~1e-7 the
        # fp32 rounding of the average moves an update by a fraction of lr (1e-2), hence atol 1e-4.
        for p, rp in zip(params, ref_params):
            torch.testing.assert_close(p, rp, rtol=1e-4, atol=1e-4)
    for params, _, _ in results[1:]:  # every worker bit-identical to rank 0
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][0]))


def test_ddp_context_manager_equals_explicit_hooks():
    explicit = run_ranks(2, ddp_worker, use_context_manager=False)
    hooked = run_ranks(2, ddp_worker, use_context_manager=True)
    for (p1, _, _), (p2, _, _) in zip(explicit, hooked):
        assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_ddp_world_of_one_is_plain_training():
    params, _, _ = ddp_worker(Comm(None), use_context_manager=False)
    ref, _ = reference(1)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))


def test_ddp_bytes_per_step_are_a_ring_all_reduce_of_the_gradients():
    def body(comm: Comm):
        model = build_model(CFG, seed=0)
        opt = make_opt(model)
        algo = DDP(model, opt, comm, bucket_mb=1000)
        before = comm.stats.ops["all_reduce"].bytes_sent if "all_reduce" in comm.stats.ops else 0
        x, y = batch(comm.rank, 0)
        model.loss(x, y).backward()
        algo.sync_gradients()
        return comm.stats.ops["all_reduce"].bytes_sent - before, model.num_params()

    for sent, n_params in run_ranks(4, body):
        # 2(n-1)/n of the fp32 gradients, up to the uneven last chunk of the ring
        assert abs(sent - 1.5 * n_params * 4) <= 4 * 4


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_gradients_are_the_codecs_average_bit_for_bit(bits):
    """--bits below 32: one quantized all-reduce of the whole gradient; every rank gets exactly
    the textbook quantized average of the workers' gradients, and the wire carries codec bytes."""
    from lowband.comm import get_codec
    from lowband.comm.quantized import quantized_all_reduce_bytes, reference_quantized_all_reduce

    codec = get_codec(bits)

    def body(comm):
        model = build_model(CFG, seed=7)
        opt = make_opt(model)
        algo = DDP(model, opt, comm, bits=bits)
        x, y = batch(comm.rank, 0)
        model.loss(x, y).backward()
        mine = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        before = comm.stats.bytes_sent
        algo.sync_gradients()
        sent = comm.stats.bytes_sent - before
        return mine, torch.cat([p.grad.reshape(-1) for p in model.parameters()]), sent

    out = run_ranks(3, body)
    expect = reference_quantized_all_reduce([o[0] for o in out], codec, op="avg")
    for _, got, sent in out:
        assert torch.equal(got, expect)
        assert sent == quantized_all_reduce_bytes(expect.numel(), 3, codec)


def test_misuse_is_refused_loudly():
    from lowband.algorithms import DiLoCo

    model = build_model(CFG, seed=7)
    opt = make_opt(model)
    with DiLoCo(model, opt, Comm(None), sync_every=2) as algo:
        x, y = batch(0, 0)
        model.loss(x, y).backward()
        opt.step()  # the hook takes the step
        assert algo.local_step == 1
        with pytest.raises(RuntimeError, match="already calls it after every optimizer step"):
            algo.step()  # the everyday mistake: stepping it by hand too
        assert algo.local_step == 1
    algo.step()  # outside the `with`, calling it yourself is the way
    assert algo.local_step == 2

    stray = torch.nn.Parameter(torch.zeros(3))
    foreign = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        DDP(model, foreign, Comm(None))


def test_stats_reset():
    comm = Comm(None)
    comm.stats.add("all_reduce", seconds=2.0)
    comm.stats.reset()
    assert comm.stats.seconds == 0 and comm.stats.by_op() == {}
