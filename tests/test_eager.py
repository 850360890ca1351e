"""--outer eager (Kale, Douillard and Donchev 2025) against the paper's rule written out per worker.

The reference keeps, on every worker m, its own outer parameters and outer momentum and applies

    Delta~_m(t) = mean_k Delta_k(t-1) - Delta_m(t-1)/M + Delta_m(t)/M

(the others' pseudo-gradients a round late, its own fresh). lowband holds the same thing as the
shared theta_g (stepped with the average, bit-identical everywhere) plus each worker's own offset
(stepped with the fresh-minus-stale proxy by its own copy of the outer optimizer); the outer step
is linear in its gradients, so the two agree to rounding.
"""

import pytest
import torch

from lowband.algorithms import DiLoCo, StreamingDiLoCo
from lowband.algorithms.diloco import outer_step_reference
from lowband.cli import main
from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.fault.parity import shared_state_of, state_digest
from lowband.testing import run_ranks
from tests.test_diloco import CFG, batch, build_model, flat, train


def textbook_eager(n, steps, H, P, lr, mu, algo_fragments):
    """Every worker's parameters after `steps` inner steps of the paper's eager rule, fragment by
    fragment (fragment p syncs at t % H == ((p + 1) H / P) % H, as Streaming DiLoCo)."""
    models = [build_model(CFG, seed=3) for _ in range(n)]
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for m in models]
    sizes = [p.numel() for p in models[0].parameters()]
    masks = [  # algo_fragments: each fragment's parameters as indices into model.parameters()
        torch.cat([torch.full((s,), i in frag) for i, s in enumerate(sizes)])
        for frag in algo_fragments
    ]
    outer = [flat(models[0]).clone().double() for _ in range(n)]
    mom = [torch.zeros_like(outer[0]) for _ in range(n)]
    prev = [[torch.zeros_like(outer[0]) for _ in range(n)] for _ in range(P)]
    for step in range(1, steps + 1):
        for r, (m, o) in enumerate(zip(models, opts)):
            x, y = batch(r, step - 1)
            m.loss(x, y).backward()
            o.step()
            o.zero_grad()
        for p in range(P):
            if step % H != ((p + 1) * H // P) % H:
                continue
            mask = masks[p]
            fresh = [(outer[r] - flat(m).double()) * mask for r, m in enumerate(models)]
            avg_prev = torch.stack(prev[p]).mean(0)
            for r, m in enumerate(models):
                applied = (avg_prev - prev[p][r] / n + fresh[r] / n) * mask
                g, b = outer[r].clone(), mom[r].clone()  # only the fragment's values step
                outer_step_reference(g, b, applied, lr, mu)
                outer[r] = torch.where(mask, g, outer[r])
                mom[r] = torch.where(mask, b, mom[r])
                new = torch.where(mask, outer[r], flat(m).double())
                torch.nn.utils.vector_to_parameters(new.float(), m.parameters())
            prev[p] = fresh
    return [flat(m) for m in models]


@pytest.mark.parametrize("n, P", [(3, 1), (2, 2)])
def test_eager_equals_the_papers_rule(n, P):
    H, steps = 4, 14  # the run ends between syncs, with reductions in flight

    def make(m, o, c):
        if P == 1:
            return DiLoCo(m, o, c, sync_every=H, outer="eager")
        return StreamingDiLoCo(m, o, c, sync_every=H, fragments=P, bits=32, outer="eager")

    def body(comm):
        model, algo, _ = train(comm, make, steps)
        index = {id(p): i for i, p in enumerate(model.parameters())}
        fragments = [{index[id(p)] for p in frag} for frag in algo.fragments]
        return flat(model), state_digest(shared_state_of(algo).shared_state()), fragments

    got = run_ranks(n, body)
    ref = textbook_eager(n, steps, H, P, 0.7, 0.9, got[0][2])
    for (params, _, _), expected in zip(got, ref):
        torch.testing.assert_close(params, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got[0][0], got[1][0])  # each worker holds its own fresh proxy
    assert len({digest for _, digest, _ in got}) == 1  # the shared state is bit-identical


def test_eager_sparse_keeps_shared_state_identical_and_differs_from_blocking():
    def body(comm, outer):
        model, algo, _ = train(
            comm,
            lambda m, o, c: DiLoCo(m, o, c, sync_every=3, compress="topk:0.25", outer=outer),
            10,
        )
        return flat(model), state_digest(shared_state_of(algo).shared_state())

    eager = run_ranks(3, body, "eager")
    blocking = run_ranks(3, body, "blocking")
    assert len({d for _, d in eager}) == 1
    assert not torch.equal(eager[0][0], blocking[0][0])
    assert torch.isfinite(eager[0][0]).all()


def test_eager_resumes_bit_for_bit():
    """A checkpoint mid-run (a reduction in flight) resumes to the uninterrupted run's bits."""
    H = 3

    def make(m, o, c):
        return DiLoCo(m, o, c, sync_every=H, outer="eager")

    def run(comm, stop, state=None):
        model = build_model(CFG, seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        algo = make(model, opt, comm)
        start = 0
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            algo.load_state_dict(state[2])
            start = algo.local_step
        for step in range(start, stop):
            x, y = batch(comm.rank, step)
            model.loss(x, y).backward()
            opt.step()
            opt.zero_grad()
            algo.step()
        out = (model.state_dict(), opt.state_dict(), algo.state_dict())
        algo.close()
        return out

    straight = run_ranks(2, lambda c: flat_of(run(c, 11)))
    half = run_ranks(2, lambda c: run(c, 7))
    resumed = run_ranks(2, lambda c: flat_of(run(c, 11, half[c.rank])))
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def flat_of(state):
    return torch.cat([t.reshape(-1).float() for t in state[0].values()])


def test_eager_options_are_checked(tmp_path, capsys):
    model = build_model(CFG, seed=3)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="outer must be blocking or eager"):
        DiLoCo(model, opt, Comm(None), outer="lazy")
    for flags, needle in [
        (["--outer", "lazy"], "--outer must be blocking or eager"),
        (["--outer", "eager", "--elastic"], "--outer eager keeps a round's reduction in flight"),
    ]:
        out = tmp_path / "x"
        assert main(["train", "--algo", "diloco", "--out", str(out), *flags]) == 2
        assert needle in capsys.readouterr().err
        assert not out.exists()
