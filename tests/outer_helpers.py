"""Shared by the tests of the outer-step algorithms (NoLoCo, CO2): a tiny model and its loop."""

import pytest
import torch

from lowband.comm import Comm
from lowband.models import ModelConfig, build_model

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)
B, L = 2, 16


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Tiny models: torch's intra-op thread pool only adds contention (10x slower on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    t = torch.randint(0, CFG.vocab_size, (B, L + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make(seed=3):
    model = build_model(CFG, seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def inner_step(model, opt, rank, step):
    x, y = batch(rank, step)
    model.loss(x, y).backward()
    opt.step()
    opt.zero_grad()


def train(comm: Comm, make_algo, steps: int, start: int = 0, state=None):
    model, opt = make()
    algo = make_algo(model, opt, comm)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
        algo.load_state_dict(state[2])
    for step in range(start, steps):
        inner_step(model, opt, comm.rank, step)
        algo.step()
    algo.close()
    return model, algo
