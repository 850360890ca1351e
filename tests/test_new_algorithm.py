"""docs/architecture.md's "how to add an algorithm", checked: examples/param_averaging.py is one
file outside the package, and once imported it is an --algo like the others."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from outer_helpers import batch, make, one_intra_op_thread  # noqa: F401

from lowband.algorithms import ALGORITHMS
from lowband.cli import build_parser, main
from lowband.comm.sync import StaticGroup
from lowband.testing import FakeGroup, run_ranks

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "param_averaging.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("param_averaging_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    yield module
    ALGORITHMS.pop("param-averaging", None)  # leave the registry as the package makes it
    del sys.modules[spec.name]


def test_it_registers_with_its_flag_and_help(example, capsys):
    assert ALGORITHMS["param-averaging"] is example.ParameterAveraging
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--average-every AVERAGE_EVERY param-averaging: Inner steps between two" in help_text
    assert main(["train", "--algo", "param-averaging", "--average-every", "0"]) == 2
    assert "--average-every must be at least 1" in capsys.readouterr().err
    assert main(["train", "--algo", "diloco", "--average-every", "3"]) == 2
    assert (
        "--average-every applies to --algo param-averaging, not diloco" in capsys.readouterr().err
    )


def test_it_trains_from_the_cli(example, tmp_path):
    out = tmp_path / "run"
    flags = ["--algo", "param-averaging", "--average-every", "5", "--workers", "1",
             "--steps", "20", "--eval-every", "10", "--batch-size", "2", "--seq-len", "32",
             "--eval-batches", "1"]  # fmt: skip
    assert main(["train", "--out", str(out), *flags]) == 0
    last = json.loads((out / "metrics" / "rank0.jsonl").read_text().splitlines()[-1])
    assert last["outer_step"] == 4


def _run(comm, example, group_of, H=3, steps=12):
    model, opt = make()
    group = group_of(comm)
    algo = example.ParameterAveraging(model, opt, group, average_every=H)
    for step in range(steps):
        x, y = batch(comm.rank, step)
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
        algo.step()
    return algo.average, algo.averages, group


def test_it_is_the_mean_and_rolls_back_a_failed_round_everywhere(example):
    static = run_ranks(3, _run, example, StaticGroup)
    for average, count, _ in static:
        assert count == 4 and torch.equal(average, static[0][0])
    faulty = run_ranks(
        3, _run, example, lambda c: FakeGroup(c, fail_reduce={2} if c.rank == 2 else ())
    )
    for average, count, group in faulty:
        assert count == 3 and [ok for _, ok in group.votes] == [True, False, True, True]
        assert torch.equal(average, faulty[0][0])
