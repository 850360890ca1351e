"""Every numeric flag of `lowband train` and `lowband finetune`, driven through 0, -1, NaN, inf and
an absurd value: each is refused in one line with exit 2, before anything is written, unless it
lies in the flag's declared range (lowband.config.TRAIN_RANGES / FINETUNE_RANGES, an algorithm's
Options checks). Generated from the parser, so a new numeric flag is covered the day it appears.
In-process and fast: refusals happen before any worker starts.
"""

from __future__ import annotations

import argparse
import math

import pytest

from lowband.cli import build_parser, main
from lowband.config import FINETUNE_RANGES, TRAIN_RANGES

VALUES = ["0", "-1", "nan", "inf", "-inf", "1e30"]
ALGO_FOR = {  # an algorithm option is tried with an algorithm that has it
    "fragments": "streaming-diloco", "overlap": "streaming-diloco", "mix": "streaming-diloco",
    "group_size": "noloco", "co2_delay": "co2", "co2_lambda": "co2", "co2_clip": "co2",
    "co2_gap_penalty": "co2", "sync_every": "diloco", "outer_lr": "diloco",
    "outer_momentum": "diloco", "bucket_mb": "ddp", "bits": "diloco",
    "local_steps": "fedavg", "server_lr": "fedavg", "participation": "fedavg",
    "clients_per_round": "fedavg", "mu": "fedprox", "local_lr": "scallion",
    "cv_scale": "scallion", "beta": "scafcom", "rho": "admm-nr", "error_decay": "diloco",
    "sam_rho": "dfedsam", "gossip_steps": "dfedsam-mgs",
}  # fmt: skip


def _numeric_flags(command: str) -> list[tuple[str, str, type]]:
    sub = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices[command]
    out = []
    for action in sub._actions:
        if action.type in (int, float) and action.option_strings:
            out.append((action.option_strings[0], action.dest, action.type))
    return out


def _in_range(name: str, value: float, ranges: dict) -> bool:
    if not math.isfinite(value):
        return False
    lo, hi = ranges.get(name, (None, None))
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _parses(kind: type, value: str) -> float | None:
    try:
        return float(value) if kind is float else int(value)
    except ValueError:
        return None


def _refusable(command: str, dest: str, kind: type, value: str) -> bool:
    """Whether the value must be refused: it does not parse, or lies outside the declared range.
    (A run-level value inside its range starts a run: not a case here.)"""
    number = _parses(kind, value)
    if number is None or dest.startswith("option:"):
        return True
    ranges = TRAIN_RANGES if command == "train" else FINETUNE_RANGES
    return not _in_range(dest, number, ranges)


CASES = [
    (command, flag, dest, kind, value)
    for command in ("train", "finetune")
    for flag, dest, kind in _numeric_flags(command)
    for value in VALUES
    if _refusable(command, dest, kind, value)
]


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse: a value that does not parse
        return int(e.code)


@pytest.mark.parametrize("command, flag, dest, kind, value", CASES)
def test_a_numeric_flag_is_refused_in_one_line_or_lies_in_its_range(
    tmp_path, capsys, command, flag, dest, kind, value
):
    out = tmp_path / "run"
    argv = [command, flag, value, "--out", str(out)]
    name = dest.split(":", 1)[-1]  # algorithm options: "option:NAME"
    if dest.startswith("option:"):
        argv += ["--algo", ALGO_FOR[name]]
    if name == "attackers":
        argv += ["--attack", "ipm"]
    number = _parses(kind, value)
    if dest.startswith("option:") and number is not None and math.isfinite(number):
        # An algorithm's Options decide (0 or 1e30 may be fine for some): when they accept, no
        # run is started here; when they refuse, it must be one line, exit 2, nothing written.
        code = _run_until_refused(argv)
        if code is None:
            assert not out.exists()
            return
    else:
        code = _main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists(), "a refused run left a folder behind"


def _run_until_refused(argv: list[str]) -> int | None:
    """main() for a value an algorithm's checks may accept: None if they did (no run started:
    the checks happen before any worker, and validate() alone is asked)."""
    import dataclasses

    from lowband.cli import given_options, validate
    from lowband.config import TrainConfig
    from lowband.errors import ConfigError

    args = build_parser().parse_args(argv)
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    try:
        validate(TrainConfig(**given, options=given_options(args)))
    except ConfigError:
        return _main(argv)
    return None
