"""`lowband` command line: train, report, demo, models.

Every `train` flag is generated from lowband.config.TrainConfig; its help is the field's docstring.
Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from lowband.config import TrainConfig, field_docs
from lowband.errors import CheckpointError, ConfigError, LowbandError, RunDirError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints a usage block otherwise)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_of(annotation: str):
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str}[base]


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        help_text = docs.get(f.name, "").replace("%", "%%")
        if default is not None:
            help_text += f" (default: {default})"
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=_type_of(f.type),
            default=argparse.SUPPRESS,
            help=help_text,
        )


def validate(cfg: TrainConfig) -> None:
    """Everything that can be checked before a worker starts. Raises LowbandError (one line)."""
    from lowband.algorithms import check_algo_options
    from lowband.comm import LinkSpec
    from lowband.models import PRESETS
    from lowband.seqpar.train import check_options as check_seqpar_options

    check_algo_options(cfg)
    check_seqpar_options(cfg)
    if cfg.model not in PRESETS:
        raise ConfigError(
            f"unknown model preset {cfg.model!r}; choose one of: {', '.join(PRESETS)}"
        )
    for name in (
        "workers",
        "steps",
        "batch_size",
        "seq_len",
        "eval_every",
        "eval_batches",
        "log_every",
        "threads",
    ):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{_flag(name)} must be at least 1, got {getattr(cfg, name)}")
    if cfg.tokens is not None and cfg.tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {cfg.tokens}")
    if cfg.ckpt_every < -1:
        raise ConfigError(
            f"--ckpt-every must be -1 (never), 0 (at the end) or more, got {cfg.ckpt_every}"
        )
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"unknown --schedule {cfg.schedule!r}; choose cosine, linear or constant")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if cfg.bucket_mb <= 0:
        raise ConfigError(f"--bucket-mb must be positive, got {cfg.bucket_mb}")
    LinkSpec.parse(cfg.link)
    if cfg.fail_at is not None:
        parts = cfg.fail_at.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) >= cfg.workers:
            raise ConfigError(
                f"--fail-at must be RANK:STEP with RANK < --workers, got {cfg.fail_at!r}"
            )


def _check_data(cfg: TrainConfig, world: int):
    from lowband.data import ShardSampler, load_corpus, split_eval

    corpus = load_corpus(cfg.data)
    train_tokens, _ = split_eval(corpus)
    for rank in range(world):  # every shard must hold at least one window
        ShardSampler(
            train_tokens,
            rank=rank,
            world_size=world,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            seed=cfg.seed,
        )
    return corpus


def cmd_train(args: argparse.Namespace) -> int:
    from lowband.launch import launch_local, launch_torchrun, under_torchrun
    from lowband.train.loop import total_steps
    from lowband.train.rundir import RunDir, default_run_name, fingerprint

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    torchrun = under_torchrun()
    rank0 = not torchrun or os.environ.get("RANK") == "0"
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--resume continues a run in its own folder; drop --out")
        run = RunDir(args.resume)
        cfg = run.load_config()
        from lowband.train.rundir import _OBSERVATION_FIELDS

        changed = sorted(
            k for k, v in given.items() if k not in _OBSERVATION_FIELDS and v != getattr(cfg, k)
        )
        if changed:
            raise ConfigError(
                f"--resume continues {run.path} with its saved config; these flags would change it: "
                + ", ".join(_flag(k) for k in changed)
            )
        cfg = dataclasses.replace(
            cfg, fail_at=given.get("fail_at"), **{k: v for k, v in given.items() if k != "fail_at"}
        )
    else:
        cfg = TrainConfig(**given)
        run = RunDir(args.out or default_run_name(cfg))
    if torchrun:
        cfg = dataclasses.replace(cfg, workers=int(os.environ["WORLD_SIZE"]))
    validate(cfg)
    world = cfg.workers
    corpus = _check_data(cfg, world)

    if args.resume:
        ckpts = run.checkpoints()
        if not ckpts:
            raise CheckpointError(f"{run.path} has no complete checkpoint to resume from")
        run.verify_checkpoint(ckpts[-1], fingerprint(cfg, corpus.sha256), world)
        if ckpts[-1].step >= total_steps(cfg, world):
            print(
                f"{run.path} is already complete ({ckpts[-1].step} steps); nothing to do",
                file=sys.stderr,
            )
            return 0
        print(f"resuming {run.path} from step {ckpts[-1].step}", file=sys.stderr)
    elif rank0:
        run.create(cfg)

    t0 = time.perf_counter()
    if torchrun:
        launch_torchrun(cfg, run.path, bool(args.resume))
    else:
        launch_local(cfg, run, bool(args.resume))
    if rank0:
        _print_summary(run, time.perf_counter() - t0)
    return 0


def _print_summary(run, seconds: float) -> None:
    import json

    if not run.summary_path.exists():
        return
    s = json.loads(run.summary_path.read_text())
    loss = s.get("final_eval_loss")
    print(
        f"done in {seconds:.1f}s: eval loss {loss:.4f}, {s['tokens_per_s']:,.0f} tokens/s, "
        f"{s['bytes_sent_per_worker'] / 1e6:,.1f} MB sent per worker, "
        f"compute utilisation {100 * s['compute_utilisation']:.0f}%\nrun folder: {run.path}",
        file=sys.stderr,
    )


def cmd_report(args: argparse.Namespace) -> int:
    from lowband.report import write_report

    if args.out:
        out = Path(args.out)
    elif len(args.runs) == 1:
        out = Path(args.runs[0]) / "report"
    else:
        out = Path("reports") / time.strftime("compare-%Y%m%d-%H%M%S")
    index = write_report(args.runs, out, title=args.title)
    print(f"report: {index}")
    return 0


DEMO_LINK = "1gbit:25ms"
DEMO_STEPS = 240
DEMO_RUNS = {
    "ddp": [],
    "diloco": ["--algo", "diloco", "--sync-every", "40"],
    "streaming-diloco": [
        "--algo", "streaming-diloco", "--sync-every", "40", "--fragments", "4", "--overlap", "3", "--bits", "4",
    ],
}  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    """DDP vs DiLoCo vs Streaming DiLoCo on 4 workers over an emulated link, then one report."""
    from lowband.report import write_report

    root = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if root.exists() and any(root.iterdir()):
        raise RunDirError(f"{root} already holds a demo; choose another --out")
    parser = build_parser()
    print(
        f"lowband demo: DDP vs DiLoCo vs Streaming DiLoCo, {TrainConfig().workers} workers, "
        f"{DEMO_STEPS} steps each, emulated link {DEMO_LINK} -> {root}",
        file=sys.stderr,
    )
    runs = []
    for name, flags in DEMO_RUNS.items():
        out = root / name
        print(f"\n[{len(runs) + 1}/{len(DEMO_RUNS)}] {name}", file=sys.stderr)
        argv = [
            "train",
            "--out",
            str(out),
            "--link",
            DEMO_LINK,
            "--steps",
            str(DEMO_STEPS),
            "--eval-every",
            "40",
            *flags,
        ]
        cmd_train(parser.parse_args(argv))
        runs.append(out)
    index = write_report(
        runs,
        root / "report",
        title=f"lowband demo: DDP vs DiLoCo vs Streaming DiLoCo over {DEMO_LINK}",
    )
    print(f"\nreport: {index}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lowband.models import describe_presets

    print(describe_presets())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowband", description="Train models when the network is the bottleneck.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a model (the main job)",
        description="Train the Llama-style model with N workers.",
    )
    add_config_flags(t)
    t.add_argument(
        "--out", help="run folder (default: runs/ALGO-MODEL-TIMESTAMP); never overwritten"
    )
    t.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN from its latest checkpoint with its saved config",
    )
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("report", help="HTML report and plots comparing runs")
    r.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    r.add_argument(
        "--out",
        help="report folder (default: RUN/report for one run, reports/compare-TIMESTAMP for several)",
    )
    r.add_argument("--title", default=None, help="report title")
    r.set_defaults(fn=cmd_report)

    d = sub.add_parser(
        "demo",
        help="what `make demo` runs: DDP vs DiLoCo vs Streaming DiLoCo over an emulated link, and the report",
    )
    d.add_argument(
        "--out",
        help="demo folder (default: runs/demo-TIMESTAMP), one run folder per algorithm inside",
    )
    d.set_defaults(fn=cmd_demo)

    m = sub.add_parser("models", help="list the model presets")
    m.set_defaults(fn=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LowbandError as e:
        print(f"lowband: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lowband: interrupted; resume with --resume RUN from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        from lowband.launch import WorkerFailed

        if isinstance(e, WorkerFailed):
            print(f"lowband: error: {e}", file=sys.stderr)
            return e.exitcode
        raise


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "validate", "RunDirError"]
