"""Every combination of --algo x {elastic, not} x {aggregate, not} x {bits} x {stragglers, not}
either trains or is refused in one clear line (exit 2), before any worker starts.

A cell the CLI accepts is then built exactly as a worker builds it (lowband.algorithms.build, from
the validated config) and trained for a few rounds on 3 ranks (threads over Gloo): on a static
group, or, for --elastic, on a FakeGroup with elastic semantics (lowband.testing), which loses one
round's reduction on one rank. Elastic training over real torchft processes is in test_elastic.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from outer_helpers import CFG, make, one_intra_op_thread  # noqa: F401

from lowband.algorithms import ALGORITHMS, build
from lowband.cli import build_parser, given_options, main, validate
from lowband.comm.sync import StaticGroup
from lowband.config import TrainConfig
from lowband.data import ShardSampler
from lowband.errors import ConfigError
from lowband.fault.parity import shared_state_of, state_digest
from lowband.testing import FakeGroup, run_ranks

CELLS = list(
    itertools.product(
        list(ALGORITHMS),
        [False, True],  # --elastic
        [None, "trimmed-mean"],  # --aggregate
        [32, 8],  # --bits
        [0, 1],  # --stragglers
    )
)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, 30_000).astype(np.uint16)

GOSSIP = ("noloco", "dpsgd", "dfedsam", "dfedsam-mgs")
"""Averaging with neighbours or random groups: no shared state, and no robust rule."""


def _has(algo: str, option: str) -> bool:
    return option in {f.name for f in dataclasses.fields(ALGORITHMS[algo].Options)}


def _flags(algo, elastic, aggregate, bits, stragglers) -> list[str]:
    flags = ["--algo", algo, "--workers", "3"]
    if _has(algo, "bits"):
        flags += ["--bits", str(bits)]
    if _has(algo, "sync_every") and algo != "ddp":
        flags += ["--sync-every", "4"]
    if _has(algo, "local_steps"):
        flags += ["--local-steps", "4"]
    if algo == "streaming-diloco":
        flags += ["--fragments", "2", "--overlap", "1"]
    if elastic:
        flags += ["--elastic", "--min-workers", "3"]
    if aggregate:
        flags += ["--aggregate", aggregate, "--byzantine-tolerance", "1"]
    if stragglers:
        flags += ["--stragglers", str(stragglers)]
    return flags


def _config(flags: list[str]) -> TrainConfig:
    args = build_parser().parse_args(["train", *flags])
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    return TrainConfig(**given, options=given_options(args))


def _train(comm, cfg: TrainConfig, elastic: bool):
    model, opt = make()  # noqa: F841 - the model trains through the algorithm
    group = (
        FakeGroup(comm, fail_reduce={2} if comm.rank == 1 else ()) if elastic else StaticGroup(comm)
    )
    algo = build(cfg, model, opt, group)
    sampler = algo.wrap_sampler(
        ShardSampler(TOKENS, rank=comm.rank, world_size=3, batch_size=2, seq_len=16, seed=0)
    )
    for step in range(1, 9):  # rounds at 4 and 8 (2 and 4 ... for streaming); round 2 fails
        x, y = sampler.batch(step)
        model.loss(x.long(), y.long()).backward()
        algo.sync_gradients()
        opt.step()
        opt.zero_grad()
        algo.step()
    algo.close()
    if cfg.algo in GOSSIP:  # replicas differ by design
        return None
    return state_digest(shared_state_of(algo).shared_state())


@pytest.mark.parametrize("algo, elastic, aggregate, bits, stragglers", CELLS)
def test_every_cell_trains_or_is_refused_in_one_line(
    tmp_path, capsys, algo, elastic, aggregate, bits, stragglers
):
    flags = _flags(algo, elastic, aggregate, bits, stragglers)
    cfg = _config(flags)
    try:
        validate(cfg)
    except ConfigError:
        out = tmp_path / "run"
        assert main(["train", "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lowband: error: ") and "\n" not in err and "Traceback" not in err
        assert not out.exists()
        return
    digests = run_ranks(3, _train, cfg, elastic, timeout_s=60.0)
    # every algorithm but NoLoCo keeps the state its replicas share bit-identical
    assert digests[0] == digests[1] == digests[2]


def test_the_matrix_refuses_only_what_it_must():
    refused = set()
    for cell in CELLS:
        try:
            validate(_config(_flags(*cell)))
        except ConfigError:
            refused.add(cell)
    algo, elastic, aggregate, bits, stragglers = range(5)
    for cell in CELLS:
        expected = (
            (cell[aggregate] and cell[algo] in ("co2", "admm-nr", *GOSSIP))
            or (cell[stragglers] and cell[algo] != "ddp")
            or (cell[stragglers] and (cell[aggregate] or cell[elastic]))
        )
        assert (cell in refused) == bool(expected), cell
