"""`lowband` command line: train, finetune, report, demo, models.

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

from lowband.config import FINETUNE_RANGES, TRAIN_RANGES, TrainConfig, check_ranges, field_docs
from lowband.errors import ConfigError, LowbandError, RunDirError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints a usage block otherwise)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_of(annotation: str):
    base = annotation.replace(" | None", "").strip()
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name == "options":  # the algorithm's options: add_algorithm_flags
            continue
        default = getattr(defaults, f.name)
        help_text = docs.get(f.name, "").replace("%", "%%")
        if _type_of(f.type) is bool and "None" in str(f.type):  # on, off or automatic
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
            continue
        if _type_of(f.type) is bool:  # an on/off switch
            parser.add_argument(
                _flag(f.name), dest=f.name, action="store_true", default=argparse.SUPPRESS,
                help=help_text,
            )  # fmt: skip
            continue
        if default is not None:
            help_text += f" (default: {default})"
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=_type_of(f.type),
            default=argparse.SUPPRESS,
            help=help_text,
        )


def add_algorithm_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per algorithm option (lowband.algorithms: each algorithm's Options dataclass);
    an option several algorithms share is one flag, its help giving each one's meaning and default."""
    from lowband.algorithms.registry import ALGORITHMS, option_fields

    group = parser.add_argument_group(
        "algorithm options", "each applies to the algorithms it names; the default is theirs"
    )
    for name, owners in option_fields().items():
        parts, by_text = [], {}
        for algo, f in owners:
            text = field_docs(ALGORITHMS[algo].Options).get(name, "").rstrip(".")
            by_text.setdefault((text, f.default), []).append(algo)
        for (text, default), algos in by_text.items():
            parts.append(f"{', '.join(algos)}: {text} (default: {default})")
        group.add_argument(
            _flag(name),
            dest=f"option:{name}",
            metavar=name.upper(),
            type=_type_of(str(owners[0][1].type)),
            default=argparse.SUPPRESS,
            help="; ".join(parts).replace("%", "%%"),
        )


def given_options(args: argparse.Namespace) -> dict:
    return {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("option:")}


def validate(cfg: TrainConfig) -> None:
    """Everything that can be checked before a worker starts. Raises LowbandError (one line)."""
    from lowband.algorithms import check as check_algorithm
    from lowband.comm import LinkMap, resolve_link
    from lowband.models import PRESETS

    check_ranges(cfg, TRAIN_RANGES)  # every numeric flag: finite and in its declared range
    check_algorithm(cfg)  # the algorithm's options and every combination with it
    if cfg.model not in PRESETS:
        raise ConfigError(
            f"unknown model preset {cfg.model!r}; choose one of: {', '.join(PRESETS)}"
        )
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"unknown --schedule {cfg.schedule!r}; choose cosine, linear or constant")
    if cfg.inner_optimizer not in ("adamw", "muon"):
        raise ConfigError(
            f"unknown --inner-optimizer {cfg.inner_optimizer!r}; choose adamw or muon"
        )
    links = resolve_link(cfg.link, cfg.link_map)
    if isinstance(links, LinkMap):
        links.check(cfg.workers)
    from lowband.train.chaos import parse_chaos

    parse_chaos(cfg)
    _validate_elastic(cfg)


def _validate_elastic(cfg: TrainConfig) -> None:
    if not cfg.elastic:
        for name in ("restarts", "lighthouse", "stall_at", "throttle_at", "kill_joiner"):
            if getattr(cfg, name) != getattr(TrainConfig(), name):
                raise ConfigError(f"{_flag(name)} needs --elastic")
        return
    if not 1 <= cfg.min_workers <= cfg.workers:
        raise ConfigError(
            f"--min-workers must be between 1 and --workers ({cfg.workers}), got {cfg.min_workers}"
        )
    from lowband.launch.lighthouse import check_lighthouse_flag

    check_lighthouse_flag(cfg)  # a malformed or silent --lighthouse: one line, within 5 s


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


def _resume(args, load_saved, given: dict, observation: set[str], options: dict | None = None):
    """(run, config) of `--resume RUN`, for train and finetune alike: the run's saved config with
    the flags that may change applied. Refused in one line: --out elsewhere, a folder that is not
    such a run (load_saved raises), a flag that would change what the run computes."""
    from lowband.train.rundir import RunDir

    if args.out and Path(args.out) != Path(args.resume):
        raise ConfigError("--resume continues a run in its own folder; drop --out")
    run = RunDir(args.resume)
    saved = load_saved(run)
    changed = sorted(
        _flag(k) for k, v in given.items() if k not in observation and v != getattr(saved, k)
    )
    saved_options = getattr(saved, "options", {})
    changed += sorted(_flag(k) for k, v in (options or {}).items() if v != saved_options.get(k))
    if changed:
        raise ConfigError(
            f"--resume continues {run.path} with its saved config; these flags would change "
            "what it computes: " + ", ".join(changed)
        )
    return run, dataclasses.replace(saved, **given)


def cmd_train(args: argparse.Namespace) -> int:
    from lowband.algorithms import check as check_algorithm
    from lowband.launch import launch_elastic, launch_local, launch_torchrun, under_torchrun
    from lowband.train.loop import total_steps
    from lowband.train.rundir import _OBSERVATION_FIELDS, RunDir, default_run_name, fingerprint

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    options = given_options(args)
    torchrun = under_torchrun()
    rank0 = not torchrun or os.environ.get("RANK") == "0"
    if args.resume:
        run, cfg = _resume(args, RunDir.load_config, given, _OBSERVATION_FIELDS, options)
        cfg = dataclasses.replace(cfg, fail_at=given.get("fail_at"))  # faults are not resumed
    else:
        cfg = TrainConfig(**given, options=options)
        run = RunDir(args.out or default_run_name(cfg))
    if torchrun:
        if cfg.elastic:
            raise ConfigError(
                "--elastic starts its own workers; add workers on other hosts with `lowband join`"
            )
        cfg = dataclasses.replace(cfg, workers=int(os.environ["WORLD_SIZE"]))
    validate(cfg)
    if not torchrun:  # the device is checked before the run folder exists (torchrun: per host)
        from lowband.launch import pick_device

        pick_device(cfg, 1 if cfg.elastic else cfg.workers)
    # Stored resolved (defaults included), so the run folder says what ran.
    cfg = dataclasses.replace(cfg, options=dataclasses.asdict(check_algorithm(cfg)))
    world = cfg.workers
    corpus = _check_data(cfg, world)

    if args.resume and not (ckpts := run.checkpoints()):
        # Stopped before its first checkpoint: nothing to continue from, so it starts again.
        print(
            f"{run.path} has no complete checkpoint yet: starting it from step 0", file=sys.stderr
        )
    elif args.resume:
        # An elastic job's checkpoint holds one state, the one its quorum committed.
        run.verify_checkpoint(
            ckpts[-1], fingerprint(cfg, corpus.sha256), 1 if cfg.elastic else world
        )
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
    elif cfg.elastic:
        launch_elastic(cfg, run, resume=bool(args.resume))
    else:
        launch_local(cfg, run, bool(args.resume))
    if rank0:
        _print_summary(run, time.perf_counter() - t0)
    return 0


def _print_summary(run, seconds: float) -> None:
    import json

    from lowband.comm.accounting import format_bytes

    if not run.summary_path.exists():
        return
    s = json.loads(run.summary_path.read_text())
    loss = s.get("final_eval_loss")
    print(
        f"done in {seconds:.1f}s: eval loss {loss:.4f}, {s['tokens_per_s']:,.0f} tokens/s, "
        f"{format_bytes(s['bytes_sent_per_worker'])} sent per worker, "
        f"compute utilisation {100 * s['compute_utilisation']:.0f}%\nrun folder: {run.path}",
        file=sys.stderr,
    )


# -- finetune: zeroth-order fine-tuning (lowband.zo; docs/zo.md) ---------------------------------


def validate_finetune(cfg) -> None:
    """Everything about a FinetuneConfig that can be checked before a worker starts."""
    from lowband.comm import LinkSpec
    from lowband.zo.models import check_model_name
    from lowband.zo.spsa import RESTORE_MODES

    check_ranges(cfg, FINETUNE_RANGES)  # every numeric flag: finite and in its declared range
    check_model_name(cfg.model)
    if cfg.bits not in (8, 32):
        raise ConfigError(f"--bits must be 8 (one byte, log scale) or 32 (fp32), got {cfg.bits}")
    if cfg.perturb_parallel and cfg.workers % 2:
        raise ConfigError(
            f"--perturb-parallel pairs workers (+eps, -eps): --workers must be even, got {cfg.workers}"
        )
    if cfg.restore not in RESTORE_MODES or cfg.restore == "arith":
        raise ConfigError(f"--restore must be copy or host, got {cfg.restore!r}")
    if cfg.ckpt_every < -1:
        raise ConfigError(
            f"--ckpt-every must be -1 (never), 0 (at the end) or more, got {cfg.ckpt_every}"
        )
    LinkSpec.parse(cfg.link)


def cmd_finetune(args: argparse.Namespace) -> int:
    from lowband.config import FinetuneConfig
    from lowband.launch import launch_local, launch_torchrun, under_torchrun
    from lowband.train.rundir import RunDir
    from lowband.zo import models
    from lowband.zo.loop import ELASTIC_FIELDS, finetune_worker, fingerprint, resume_point

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(FinetuneConfig)
        if hasattr(args, f.name)
    }

    if args.resume:
        run, cfg = _resume(args, RunDir.load_finetune_config, given, ELASTIC_FIELDS)
    else:
        cfg = FinetuneConfig(**given)
        if cfg.init is not None:
            found = models.resolve_init(cfg.init)
            if "model" not in given and found.model is not None:
                cfg = dataclasses.replace(cfg, model=found.model)
            elif found.model is not None and found.model != cfg.model:
                raise ConfigError(
                    f"--init {cfg.init} holds a {found.model!r} model, --model is {cfg.model!r}"
                )
        run = RunDir(
            args.out or time.strftime(f"runs/zo-{cfg.model.replace(':', '-')}-%Y%m%d-%H%M%S")
        )
    torchrun = under_torchrun()
    rank0 = not torchrun or os.environ.get("RANK") == "0"
    if torchrun:
        cfg = dataclasses.replace(cfg, workers=int(os.environ["WORLD_SIZE"]))
    validate_finetune(cfg)
    if not torchrun:  # before the run folder exists
        from lowband.launch import pick_device

        pick_device(cfg, cfg.workers)
    groups = cfg.workers // 2 if cfg.perturb_parallel else cfg.workers
    corpus = _check_data(cfg, groups)
    ckpt, last = (
        resume_point(run, cfg, fingerprint(cfg, corpus.sha256)) if args.resume else (None, 0)
    )
    if cfg.init is not None and ckpt is None:  # weights that do not fit fail here, in one line
        shell = models.build(cfg.model, corpus.vocab_size, cfg.seed, "meta")
        models.check_fits(shell, models.load_init_state(models.resolve_init(cfg.init)), cfg.init)

    if args.resume:
        if last >= cfg.steps:
            if rank0:
                print(
                    f"{run.path} is already complete ({last} steps); nothing to do", file=sys.stderr
                )
            return 0
        base = f"checkpoint {ckpt.step}" if ckpt else "the starting weights"
        if rank0:
            print(
                f"resuming {run.path}: {base} + {last - (ckpt.step if ckpt else 0)} logged "
                f"steps replayed, continuing at step {last + 1}",
                file=sys.stderr,
            )
    elif rank0:
        run.create(cfg)
    t0 = time.perf_counter()
    if torchrun:
        launch_torchrun(cfg, run.path, bool(args.resume), worker=finetune_worker)
    else:
        launch_local(cfg, run, bool(args.resume), worker=finetune_worker)
    if rank0:
        _print_summary(run, time.perf_counter() - t0)
    return 0


def _add_finetune_parser(sub) -> None:
    from lowband.config import FinetuneConfig

    f = sub.add_parser(
        "finetune",
        help="zeroth-order fine-tuning: one byte per worker per step (MeZO / Just One Byte / DistZO2)",
        description="Fine-tune with shared-seed zeroth-order steps: no backward pass, no optimizer "
        "state; workers exchange one scalar per perturbation (docs/zo.md).",
    )
    add_config_flags(f, FinetuneConfig)
    f.add_argument("--out", help="run folder (default: runs/zo-MODEL-TIMESTAMP); never overwritten")
    f.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN: its latest checkpoint plus a replay of its (seed, scalar) log",
    )
    f.set_defaults(fn=cmd_finetune)


# -- end finetune ---------------------------------------------------------------------------------


def _add_generate_parser(sub) -> None:  # lowband.serve; docs/inference.md
    from lowband.serve.cli import add_generate_parser

    add_generate_parser(sub, add_config_flags)


def _add_serve_parser(sub) -> None:  # lowband.serve.http; docs/inference.md
    from lowband.serve.cli import add_serve_parser

    add_serve_parser(sub, add_config_flags)


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


def cmd_join(args: argparse.Namespace) -> int:
    """Add one worker to a running elastic job, after proving the run's secret."""
    import socket

    from lowband.fault.admission import load_secret, request_admission
    from lowband.launch import join_job
    from lowband.launch.admission import admission_address, parse_admission

    addr = args.admission
    if addr is None:
        if args.run is None:
            raise ConfigError("lowband join needs RUN (a run folder) or --admission HOST:PORT")
        addr = admission_address(args.run)
    token = args.token or os.environ.get("LOWBAND_TOKEN")
    secret_file = args.token_file
    if token is None and secret_file is None and args.run is not None:
        secret_file = Path(args.run) / "secret"
    secret = load_secret(token, secret_file)
    joiner = f"{socket.gethostname()}-{os.getpid()}"
    payload = parse_admission(request_admission(addr, secret, joiner, timeout=args.timeout))
    print(
        f"admitted to {payload['run']} as worker {payload['index']}; joining at the next synchronisation",
        file=sys.stderr,
    )
    join_job(payload)
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
    add_algorithm_flags(t)
    t.add_argument(
        "--out", help="run folder (default: runs/ALGO-MODEL-TIMESTAMP); never overwritten"
    )
    t.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN from its latest checkpoint with its saved config",
    )
    t.set_defaults(fn=cmd_train)
    _add_finetune_parser(sub)
    _add_generate_parser(sub)
    _add_serve_parser(sub)
    from lowband.decentral.command import add_parser as _add_dadao_parser  # docs/decentralized.md

    _add_dadao_parser(sub, add_config_flags)
    from lowband.plan.command import add_parser as _add_plan_parser
    from lowband.plan.command import add_probe_parser

    _add_plan_parser(sub)
    add_probe_parser(sub)
    from lowband.plan.simulate_command import add_parser as _add_simulate_parser

    _add_simulate_parser(sub)

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

    j = sub.add_parser(
        "join",
        help="add a worker to a running elastic job (lowband train --elastic)",
        description="Prove the run's secret to its admission server, then join the job: the new "
        "worker receives the model and optimizer state from a live peer at the next synchronisation.",
    )
    j.add_argument("run", nargs="?", metavar="RUN", help="the job's run folder (same host)")
    j.add_argument(
        "--admission", metavar="HOST:PORT", help="the job's admission address (printed at start)"
    )
    j.add_argument("--token", help="the run's secret (or set LOWBAND_TOKEN; default: RUN/secret)")
    j.add_argument("--token-file", help="a file holding the run's secret")
    j.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for admission")
    j.set_defaults(fn=cmd_join)

    m = sub.add_parser("models", help="list the model presets")
    m.set_defaults(fn=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    from lowband.launch.signals import Stopped, stop_on_signals

    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():  # SIGTERM, SIGHUP: as Ctrl-C (lowband.launch.signals)
            return args.fn(args)
    except LowbandError as e:
        print(f"lowband: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = f"stopped by {e}" if isinstance(e, Stopped) else "interrupted"
        print(
            f"lowband: {how}; the workers were stopped; resume with --resume RUN from the last "
            "checkpoint",
            file=sys.stderr,
        )
        return 128 + e.signum if isinstance(e, Stopped) else 130
    except Exception as e:
        from lowband.launch import WorkerFailed

        if isinstance(e, WorkerFailed):
            print(f"lowband: error: {e}", file=sys.stderr)
            return e.exitcode
        raise


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "validate", "RunDirError"]
