"""Sequence parallelism's bad inputs: shards that do not match across ranks raise the same clear
ConfigError on every rank before anything is sent (they used to abort the process inside Gloo),
and the balancer places every batch that fits (it used to refuse some, saying they did not fit).

The mismatch cases run in a child process (this file, run as a script): if the check ever
regressed, Gloo's abort would end that child, not the test session.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.seqpar import hybrid_attention, ring_attention, token_ring_attention, ulysses_attention
from lowband.seqpar.balance import _degrees, balance, shard_tokens
from lowband.seqpar.train import SeqParallel
from lowband.testing import gloo_groups, run_ranks

torch.set_num_threads(1)

FNS = {"ring": ring_attention, "tokenring": token_ring_attention, "ulysses": ulysses_attention}

# (name, variant, ranks, per-rank overrides, what the message must say)
MISMATCHES = [
    ("length", "ring", 2, {1: {"L": 12}}, "local length 8 on rank 0 vs 12 on rank 1"),
    # rank 1's own length check would fail (14 is no multiple of 4): it must not raise alone
    ("bad-length", "tokenring", 2, {1: {"L": 7}}, "local length 8 on rank 0 vs 7 on rank 1"),
    ("heads", "ulysses", 2, {0: {"H": 2, "K": 2}}, "query heads 2 on rank 0 vs 4 on rank 1"),
    ("seq_len", "ring", 2, {1: {"seq_len": 13}}, "seq_len None on rank 0 vs 13 on rank 1"),
    ("causal", "ring", 2, {0: {"causal": False}}, "causal False on rank 0 vs True on rank 1"),
    ("dtype", "ulysses", 2, {1: {"dtype": torch.float64}}, "dtype float32 on rank 0 vs float64"),
    ("cu_seqlens", "ring", 2, {1: {"cu": [0, 5, 16]}}, "cu_seqlens None on rank 0 vs a value"),
    ("hybrid", "hybrid", 4, {3: {"L": 6}}, "local length 4 on ranks 0, 1, 2 vs 6 on rank 3"),
]


def _one_rank(comm: Comm, variant: str, overrides: dict, groups: dict) -> dict:
    """Attention on this rank's (possibly mismatched) shard: the error and the ops that ran."""
    o = {"L": 8 if variant != "hybrid" else 4, "H": 4, "K": 4, "dtype": torch.float32}
    o.update(overrides.get(comm.rank, {}))
    g = torch.Generator().manual_seed(comm.rank)
    q = torch.randn(1, o["H"], o["L"], 8, generator=g).to(o["dtype"])
    k, v = (torch.randn(1, o["K"], o["L"], 8, generator=g).to(o["dtype"]) for _ in range(2))
    kw = dict(causal=o.get("causal", True), seq_len=o.get("seq_len"), cu_seqlens=o.get("cu"))
    try:
        if variant == "hybrid":
            ring_rank, u = divmod(comm.rank, 2)
            uc = Comm(groups["u"][ring_rank](u), stats=comm.stats)
            rc = Comm(groups["r"][u](ring_rank), stats=comm.stats)
            hybrid_attention(q, k, v, uc, rc, **kw)
        else:
            FNS[variant](q, k, v, comm, **kw)
        error = None
    except ConfigError as e:
        error = str(e)
    return {"error": error, "ops": sorted(comm.stats.by_op())}


def _child() -> None:
    out = {}
    for name, variant, ranks, overrides, _ in MISMATCHES:
        groups = {
            "u": [gloo_groups(2, prefix=f"{name}-u{i}") for i in range(ranks // 2)],
            "r": [gloo_groups(ranks // 2, prefix=f"{name}-r{i}") for i in range(2)],
        }
        out[name] = run_ranks(ranks, _one_rank, variant, overrides, groups, timeout_s=30)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def mismatch_results() -> dict:
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, variant, ranks, overrides, expected", MISMATCHES)
def test_mismatched_shards_raise_the_same_error_on_every_rank(
    mismatch_results, name, variant, ranks, overrides, expected
):
    results = mismatch_results[name]
    errors = [r["error"] for r in results]
    assert len(errors) == ranks and all(e is not None for e in errors), errors
    assert len(set(errors)) == 1, errors  # the same message everywhere
    assert expected in errors[0] and "\n" not in errors[0], errors[0]
    for r in results:  # nothing but the one small check went on the wire
        assert r["ops"] == ["all_gather"], r["ops"]


def test_training_checks_its_first_attention_call_only():
    def body(comm: Comm) -> int:
        sp = SeqParallel("ring", comm, dp_rank=0, dp_size=1)
        q = torch.randn(1, 2, 4, 8)
        for _ in range(3):
            sp.attn_fn(q, q, q, causal=True)
        return comm.stats.by_op()["all_gather"]["calls"]

    assert run_ranks(2, body) == [1, 1]


# -- the balancer ---------------------------------------------------------------------------------


def _fits_somehow(lengths: list[int], ranks: int, capacity: int) -> bool:
    """Exhaustive: some aligned group per sequence keeps every rank within its capacity."""
    options = [
        [
            (tuple(range(s, s + d)), shard_tokens(n, d))
            for d in _degrees(ranks)
            for s in range(0, ranks, d)
        ]
        for n in lengths
    ]
    tokens = [0] * ranks

    def place(i: int) -> bool:
        if i == len(lengths):
            return True
        for g, need in options[i]:
            if all(tokens[r] + need <= capacity for r in g):
                for r in g:
                    tokens[r] += need
                if place(i + 1):
                    return True
                for r in g:
                    tokens[r] -= need
        return False

    return place(0)


def _check_placement(rep, lengths, ranks, capacity) -> None:
    per_rank = [0] * ranks
    for n, g in zip(lengths, rep.balanced.groups):
        assert g == tuple(range(g[0], g[0] + len(g))) and g[0] % len(g) == 0
        for r in g:
            per_rank[r] += shard_tokens(n, len(g))
    assert per_rank == rep.balanced.tokens and max(per_rank) <= capacity


@pytest.mark.parametrize(
    "lengths, ranks, capacity",
    [([37, 40, 46], 2, 65), ([356, 138, 136, 113], 4, 194), ([98, 121, 48], 8, 37)],
)
def test_batches_the_greedy_pass_could_not_place_are_placed(lengths, ranks, capacity):
    """Each was refused with "does not fit" although splitting over all ranks fits."""
    rep = balance(lengths, ranks, capacity)
    _check_placement(rep, lengths, ranks, capacity)
    assert rep.notes["fallback"]


def test_balancer_refuses_only_what_cannot_fit():
    rng = random.Random(0)
    placed = refused = 0
    for _ in range(1500):
        ranks = rng.choice([2, 4, 8])
        capacity = rng.randint(4, 120)
        lengths = [rng.randint(1, capacity * ranks // 2 + 1) for _ in range(rng.randint(1, 5))]
        try:
            rep = balance(lengths, ranks, capacity)
        except ConfigError as e:
            refused += 1
            assert not _fits_somehow(lengths, ranks, capacity), (lengths, ranks, capacity)
            if "does not fit" in str(e):  # said only where it is provably so
                too_long = any(shard_tokens(n, ranks) > capacity for n in lengths)
                assert too_long or sum(lengths) > ranks * capacity, str(e)
            continue
        placed += 1
        _check_placement(rep, lengths, ranks, capacity)
    assert placed > 300 and refused > 300


def test_refusal_says_what_the_batch_needs():
    with pytest.raises(ConfigError, match=r"the batch \(45,000 tokens\) does not fit 4 ranks"):
        balance([9000] * 5, 4, 10_000)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    _child()
