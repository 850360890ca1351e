"""The counter-based perturbation generator (lowband.zo.rng): a reference in Python integers,
eager == compiled bit for bit, slices, moments, independence across seeds."""

from __future__ import annotations

import math

import pytest
import torch

from lowband.zo import rng
from lowband.zo.spsa import noise

M64 = (1 << 64) - 1


def reference(seed: int, index: int) -> float:
    """z of one element, written from the definition with Python's unbounded ints."""
    key = rng.key_for(seed) & M64
    h = (index * 0x9E3779B97F4A7C15 + key) & M64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & M64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & M64
    h ^= h >> 31
    total = sum((h >> s) & 0xFFFF for s in (0, 16, 32, 48))
    return float(torch.tensor(float(total - 131070), dtype=torch.float32) * rng._SCALE)


@pytest.mark.parametrize("seed", [0, 1, 2**62 + 12345])
def test_matches_the_integer_reference_at_any_offset(seed):
    for offset in (0, 7, 2**31 - 3, 2**33 + 5, 2**50):
        z = rng.counter_normal(seed, offset, (4,), "cpu")
        want = [reference(seed, offset + i) for i in range(4)]
        assert z.tolist() == want, (seed, offset)


def test_a_slice_equals_the_same_elements_of_a_larger_draw():
    whole = rng.counter_normal(3, 100, (1000,), "cpu")
    part = rng.counter_normal(3, 100 + 337, (5, 7), "cpu")
    assert torch.equal(part.reshape(-1), whole[337 : 337 + 35])


def test_noise_continues_the_stream_across_parameters():
    params = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2, 2)]
    flat = rng.counter_normal(9, 0, (sum(p.numel() for p in params),), "cpu")
    got = torch.cat([z.reshape(-1) for _, z in noise(params, 9)])
    assert torch.equal(got, flat)


def test_moments_and_independence():
    n = 1 << 20
    z = rng.counter_normal(11, 0, (n,), "cpu").double()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 0.01
    assert abs((z**4).mean().item() - 2.7) < 0.03  # Irwin-Hall(4): 3 - 6/(5*4)
    assert z.abs().max().item() <= math.sqrt(12) + 1e-6
    other = rng.counter_normal(12, 0, (n,), "cpu").double()  # the next seed
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 4 / math.sqrt(n)
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 4 / math.sqrt(n)


def test_compiled_draws_the_same_bits_as_eager():
    eager = [rng.counter_normal(5, off, (n,), "cpu") for off, n in [(0, 4096), (123457, 1001)]]
    rng.configure(compile=True)
    try:
        compiled = [
            rng.counter_normal(5, off, (n,), "cpu") for off, n in [(0, 4096), (123457, 1001)]
        ]
        assert rng._compiled is not None and rng.compiled_enabled()  # it really compiled
    finally:
        rng.configure(compile=False)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)
