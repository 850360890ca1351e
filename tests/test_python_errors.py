"""An option's error names it as its reader wrote it (issue #19, point 4).

From Python (an algorithm's constructor or its Options) the message names the keyword argument,
`co2_delay`; from the CLI, which turns flags into cfg.options and builds the algorithm through the
registry, it names the flag, `--co2-delay`. The registry is the one seam that rewords them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lowband
from lowband.algorithms import registry
from lowband.algorithms.registry import OptionError
from lowband.cli import main
from lowband.comm import Comm
from lowband.config import TrainConfig
from lowband.errors import ConfigError

CASES = [  # (class, keyword arguments, what Python names, what the CLI names)
    (lowband.CO2, {"co2_delay": 3}, "co2_delay must be 0 or 1, got 3", "--co2-delay must be"),
    (lowband.CO2, {"outer_momentum": 1.0}, "CO2 beta (outer_momentum)", "(--outer-momentum)"),
    (lowband.DiLoCo, {"sync_every": 0}, "sync_every must be at least 1", "--sync-every must"),
    (lowband.DiLoCo, {"outer_lr": -1.0}, "outer_lr must be positive", "--outer-lr must"),
    (
        lowband.StreamingDiLoCo,
        {"sync_every": 10, "fragments": 4},
        "sync_every=10 must be a multiple of fragments=4",
        "--sync-every 10 must be a multiple of --fragments 4",
    ),
    (
        lowband.StreamingDiLoCo,
        {"sync_every": 8, "fragments": 4, "overlap": 2},
        "overlap=2 must be below sync_every/fragments = 2",
        "--overlap 2 must be below --sync-every/--fragments = 2",
    ),
    (lowband.StreamingDiLoCo, {"mix": 2.0}, "mix must be in [0, 1], got 2.0", "--mix must be"),
    (lowband.NoLoCo, {"group_size": 1}, "group_size must be at least 2", "--group-size must"),
    (lowband.NoLoCo, {"outer_lr": 2.0}, "NoLoCo gamma (outer_lr)", "NoLoCo gamma (--outer-lr)"),
    (lowband.DDP, {"bucket_mb": 0.0}, "bucket_mb must be positive", "--bucket-mb must be"),
]


def _flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.mark.parametrize(("cls", "options", "python", "cli"), CASES)
def test_python_names_arguments_and_the_cli_names_flags(
    cls, options, python, cli, tmp_path, capsys
):
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as raised:
        cls(model, opt, Comm(None), **options)
    assert python in str(raised.value) and "--" not in str(raised.value)

    argv = ["train", "--algo", cls.name, *_flags(options), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert cli in err and err.count("\n") == 1, err
    assert not any(f"{k}" in err for k in options if "_" in k), err  # no Python name left
    assert not (tmp_path / "x").exists()


def test_a_constructor_check_on_the_model_is_reworded_too():
    """StreamingDiLoCo cuts the model into fragments in its constructor: more fragments than
    parameter tensors is refused there, after the options passed."""
    model = nn.Linear(4, 4)  # two tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"sync_every": 4, "fragments": 4, "overlap": 0}
    with pytest.raises(ConfigError, match=r"^fragments=4 is more than the model's 2 parameter"):
        lowband.StreamingDiLoCo(model, opt, Comm(None), **options)
    cfg = TrainConfig(algo="streaming-diloco", options=options)
    with pytest.raises(ConfigError, match=r"^--fragments 4 is more than the model's 2 parameter"):
        registry.build(cfg, model, opt, Comm(None))


BAD = {int: [0, -1, 3, 7], float: [0.0, -1.0, 1.0, 2.0]}


def test_every_option_error_names_arguments_from_python_and_flags_from_the_cli():
    """Every option of every registered algorithm, through a handful of out-of-range values:
    whatever the Options refuse, Python reads no flag and the CLI no Python name."""
    refused = 0
    for name, cls in registry.discover().items():
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        for field in fields.values():
            base = str(field.type).replace(" | None", "")
            if base not in ("int", "float"):  # the numeric options (strings have their own tests)
                continue
            kind = float if base == "float" else int
            for value in BAD[kind]:
                try:
                    cls.Options(**{field.name: value})
                except ConfigError as e:
                    python = str(e)
                else:
                    continue
                refused += 1
                with pytest.raises(ConfigError) as cli:
                    registry.check(TrainConfig(algo=name, options={field.name: value}))
                where = f"{name} {field.name}={value}"
                assert "--" not in python, where
                for option in fields:
                    flag = "--" + option.replace("_", "-")
                    named = f"{option} " in python or f"{option}=" in python
                    if named and "_" in option:
                        assert option not in str(cli.value) and flag in str(cli.value), where
                    if named:
                        assert flag in str(cli.value), (where, str(cli.value))
    assert refused >= 15  # the sweep did reach the checks


def test_option_error_renders_both_ways():
    e = OptionError("{overlap=} must be below {sync_every} in [0, 1)", overlap=3)
    assert str(e) == "overlap=3 must be below sync_every in [0, 1)"
    assert e.as_flags() == "--overlap 3 must be below --sync-every in [0, 1)"
    assert isinstance(e, ConfigError)
