"""DiLoCo and Streaming DiLoCo against references: DDP, a one-process textbook simulation, golden runs."""

import json
import time
from pathlib import Path

import pytest
import torch

from lowband.algorithms import DDP, DiLoCo, StreamingDiLoCo
from lowband.algorithms.diloco import outer_step_reference, strided_fragments
from lowband.comm import Comm, LinkSpec
from lowband.errors import ConfigError
from lowband.models import ModelConfig, build_model
from lowband.testing import run_ranks

CFG = ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)
B, L = 2, 16
GOLDEN = Path(__file__).parent / "golden"


def batch(rank: int, step: int, vocab: int = CFG.vocab_size):
    g = torch.Generator().manual_seed(1000 * step + rank)
    t = torch.randint(0, vocab, (B, L + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(comm: Comm, make_algo, steps: int, opt_name: str = "adamw", cfg=CFG, seed=3):
    model = build_model(cfg, seed=seed)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    algo = make_algo(model, opt, comm)
    losses = []
    for step in range(steps):
        x, y = batch(comm.rank, step, cfg.vocab_size)
        loss = model.loss(x, y)
        loss.backward()
        algo.sync_gradients()
        opt.step()
        opt.zero_grad()
        algo.step()
        losses.append(loss.item())
    algo.close()
    return model, algo, losses


# -- DiLoCo == DDP in the limit ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
def test_diloco_h1_lr1_no_momentum_equals_ddp_with_sgd(n):
    """With a linear inner optimizer, one inner step + outer SGD(lr 1, no momentum) is data parallel.

    (With AdamW the two differ by construction: DiLoCo averages AdamW *updates*, DDP gradients.)
    """
    dil = run_ranks(
        n,
        lambda c: flat(
            train(
                c,
                lambda m, o, c: DiLoCo(m, o, c, sync_every=1, outer_lr=1.0, outer_momentum=0.0),
                5,
                "sgd",
            )[0]
        ),
    )
    ddp = run_ranks(n, lambda c: flat(train(c, lambda m, o, c: DDP(m, o, c), 5, "sgd")[0]))
    for a, b in zip(dil, ddp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- DiLoCo == the textbook rule, simulated in one process ---------------------------------------------
def textbook_diloco(n: int, steps: int, H: int, lr: float, mu: float) -> torch.Tensor:
    models = [build_model(CFG, seed=3) for _ in range(n)]
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for m in models]
    theta_g = flat(models[0]).clone()
    momentum = torch.zeros_like(theta_g)
    for step in range(steps):
        for r, (m, o) in enumerate(zip(models, opts)):
            x, y = batch(r, step)
            m.loss(x, y).backward()
            o.step()
            o.zero_grad()
        if (step + 1) % H == 0:
            delta = torch.stack([theta_g - flat(m) for m in models]).mean(0)
            outer_step_reference(theta_g, momentum, delta, lr, mu)
            for m in models:
                torch.nn.utils.vector_to_parameters(theta_g.clone(), m.parameters())
    return theta_g


@pytest.mark.parametrize("n", [1, 3])
def test_diloco_equals_the_textbook_rule(n):
    got = run_ranks(
        n, lambda c: flat(train(c, lambda m, o, c: DiLoCo(m, o, c, sync_every=3), 9)[0])
    )
    ref = textbook_diloco(n, 9, 3, 0.7, 0.9)
    for g in got:
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(g, got[0]) for g in got)  # bit-identical workers after an outer step


# -- Streaming: schedule, fragments, overlap, mixing ---------------------------------------------------
def test_every_fragment_syncs_exactly_once_per_h_steps():
    H, P, steps = 12, 3, 36
    _, algo, _ = train(
        Comm(None),
        lambda m, o, c: StreamingDiLoCo(m, o, c, sync_every=H, fragments=P, overlap=2),
        steps,
    )
    assert [t for t, _ in algo.sync_history] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    for window in range(steps // H):
        frags = [f for t, f in algo.sync_history if window * H < t <= (window + 1) * H]
        assert sorted(frags) == list(range(P))


def test_fragments_are_strided_over_layers_and_cover_every_parameter():
    cfg = ModelConfig(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)
    model = build_model(cfg)
    frags = strided_fragments(model, 2)
    ids = [id(p) for f in frags for p in f]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    layer_of = {id(p): i for i, layer in enumerate(model.layers) for p in layer.parameters()}
    assert {layer_of[id(p)] for p in frags[0] if id(p) in layer_of} == {0, 2, 4}
    assert {layer_of[id(p)] for p in frags[1] if id(p) in layer_of} == {1, 3}
    assert any(p is model.tok_embeddings.weight for p in frags[0])
    assert any(p is model.output.weight for p in frags[1])
    sizes = [sum(p.numel() for p in f) for f in frags]
    assert sizes[0] != sizes[1]  # uneven fragments are fine


@pytest.mark.parametrize("bits", [32, 4])
def test_streaming_uneven_fragments_odd_sizes_all_ranks_identical_globals(bits):
    cfg = ModelConfig(
        dim=36, n_layers=3, n_heads=6, n_kv_heads=3, ffn_dim=70, vocab_size=61
    )  # nothing divides 64

    def body(c):
        model, algo, _ = train(
            c,
            lambda m, o, c: StreamingDiLoCo(
                m, o, c, sync_every=6, fragments=2, overlap=1, bits=bits
            ),
            12,
            cfg=cfg,
        )
        return torch.cat([g.reshape(-1) for f in algo.global_params for g in f]), algo.outer_steps

    out = run_ranks(3, body)
    assert all(steps == 4 for _, steps in out)
    assert all(torch.equal(g, out[0][0]) for g, _ in out)


def test_overlap_really_overlaps():
    """The reduction is in flight while inner steps run, and almost none of it is exposed."""
    link = LinkSpec.parse("10mbit:150ms")  # each fragment sync: ~0.6 s on the wire

    def body(c):
        model = build_model(CFG, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        algo = StreamingDiLoCo(model, opt, c, sync_every=8, fragments=2, overlap=3, bits=32)
        in_flight_during_step = []
        for step in range(8):
            x, y = batch(c.rank, step)
            model.loss(x, y).backward()
            opt.step()
            opt.zero_grad()
            for _, work in algo._pending.values():
                if hasattr(work, "done"):
                    in_flight_during_step.append(not work.done())
            time.sleep(0.3)  # an inner step's compute
            algo.step()
        algo.close()
        ops = c.stats.by_op()
        return (
            in_flight_during_step,
            ops["outer_wait"]["seconds"],
            c.stats.background_seconds,
            algo.outer_steps,
        )

    for in_flight, exposed, background, outer_steps in run_ranks(2, body, link=link):
        assert outer_steps == 2
        assert any(in_flight)  # the collective was on the wire while an inner step computed
        assert background > 0.6  # the link time was spent (2 syncs of ~0.37 s each) ...
        assert exposed < 0.2  # ... but not waited for


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mix_limits(alpha):
    """alpha = 0: the landed global fragment replaces the local one; alpha = 1: the local one is kept."""

    def body(c):
        model = build_model(CFG, seed=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        algo = StreamingDiLoCo(model, opt, c, sync_every=4, fragments=1, overlap=2, mix=alpha)
        for step in range(4):
            x, y = batch(c.rank, step)
            model.loss(x, y).backward()
            opt.step()
            opt.zero_grad()
            if step == 3:
                before = flat(model).clone()
            algo.step()
        return flat(model), before, torch.cat([g.reshape(-1) for g in algo.global_params[0]])

    for after, before, theta_g in run_ranks(2, body):
        assert not torch.equal(theta_g, before)
        assert torch.equal(after, theta_g if alpha == 0.0 else before)


def test_bad_streaming_settings():
    model = build_model(CFG)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="multiple of fragments=4"):
        StreamingDiLoCo(model, opt, Comm(None), sync_every=10, fragments=4)
    with pytest.raises(ConfigError, match="overlap=2"):
        StreamingDiLoCo(model, opt, Comm(None), sync_every=8, fragments=4, overlap=2)
    with pytest.raises(ConfigError, match="mix must be"):
        StreamingDiLoCo(model, opt, Comm(None), sync_every=8, fragments=2, mix=1.5)


def test_bytes_per_sync_shrink_with_bits_and_fragments():
    def peak(c, **kw):
        return train(c, lambda m, o, c: StreamingDiLoCo(m, o, c, sync_every=8, overlap=0, **kw), 8)[
            1
        ].peak_sync_bytes

    full = run_ranks(2, peak, fragments=1, bits=32)[0]
    quarter = run_ranks(2, peak, fragments=4, bits=32)[0]
    four_bit = run_ranks(2, peak, fragments=1, bits=4)[0]
    assert 0.15 < quarter / full < 0.45  # ~1/P (fragments are uneven)
    assert 4.5 / 32 <= four_bit / full < 4.5 / 32 * 1.1  # 4 bits + fp32 scale per 64 values


# -- golden trajectories -----------------------------------------------------------------------------
GOLDEN_RUNS = {
    "diloco": lambda m, o, c: DiLoCo(m, o, c, sync_every=4),
    "streaming_diloco": lambda m, o, c: StreamingDiLoCo(
        m, o, c, sync_every=8, fragments=2, overlap=1, bits=4
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_RUNS))
def test_golden_trajectory(name, request):
    out = run_ranks(2, lambda c: train(c, GOLDEN_RUNS[name], 16)[2])
    record = {"losses_rank0": out[0], "losses_rank1": out[1]}
    path = GOLDEN / f"{name}.json"
    if request.config.getoption("--update-golden"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
    golden = json.loads(path.read_text())
    for key in record:
        assert record[key] == pytest.approx(golden[key], rel=1e-4), key
