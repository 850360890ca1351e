"""The algorithm registry: names, options, the one place combinations are checked, and building.

An algorithm registers itself by defining `name` on its class (lowband.algorithms.base); every
module of this package is imported by `discover()`, so adding an algorithm is one new file here,
and nothing else needs a line. Two classes claiming one name, an `Options` that is not a kw_only
dataclass, or two algorithms giving one option different types fail loudly at import.

`check(cfg)` is where every combination of options either passes or is refused with a reason
(one ConfigError line): the algorithm's own options (unknown ones, values: `Options.__post_init__`),
the run-level features it supports (`Algorithm.supports`), and what --elastic can and cannot be
combined with. The CLI's `validate` and `build` both call it.

An option's error names it as its reader wrote it: `OptionError` says `sync_every` to a Python
caller (`lowband.DiLoCo(..., sync_every=0)`), and this module, the one place a run turns
cfg.options into objects, rewords it as `--sync-every` for the CLI (`_as_flags`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import pkgutil
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from lowband.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lowband.algorithms.base import Algorithm
    from lowband.comm import Codec, Comm
    from lowband.comm.sync import SyncGroup
    from lowband.config import TrainConfig

ALGORITHMS: dict[str, type[Algorithm]] = {}
"""--algo name -> class, filled as the algorithm modules are imported."""

FEATURES = {
    "robust": "--aggregate and --attack",
    "stragglers": "--stragglers (gradient coding)",
    "straggler_delay": "--slow-workers/--straggler-delay",
    "seq_parallel": "--seq-parallel",
    "elastic": "--elastic",
    "compile": "--compile",
    "compress": "--compress",
    "link_map": "--link-map",
}
"""What each name in `Algorithm.supports` stands for, in the words of an error message."""
EVERY_ALGORITHM = frozenset({"elastic", "compile", "compress", "link_map"})
"""Features no algorithm declares: every one runs elastic or compiled, and --compress is an option
of the algorithms that have it (refused for the others as an unknown option)."""

CONFLICTS = [
    (
        "elastic",
        "stragglers",
        "gradient coding decodes from a fixed set of --workers; an elastic job drops a straggler "
        "from the next quorum instead (--heartbeat-timeout)",
    ),
    (
        "elastic",
        "seq_parallel",
        "sequence parallelism shards every sequence over fixed groups of --cp ranks, which a "
        "changing quorum cannot keep",
    ),
    (
        "stragglers",
        "robust",
        "gradient coding decodes the exact average from the survivors' coded sums, while a robust "
        "rule needs every worker's own update",
    ),
    (
        "seq_parallel",
        "robust",
        "the ranks of a --cp group hold partial gradients of the same sequences, not independent "
        "updates a robust rule could compare",
    ),
    (
        "stragglers",
        "seq_parallel",
        "gradient coding's data parts are whole workers' batches, which a --cp group shares",
    ),
    (
        "elastic",
        "link_map",
        "a link map names workers by rank, while an elastic job's quorum changes who holds which "
        "rank; use one --link for every pair",
    ),
    (
        "compile",
        "seq_parallel",
        "sequence-parallel attention runs collectives inside every block, which torch.compile "
        "would split into many graphs; drop --compile (it is off by default with --seq-parallel)",
    ),
]
"""Pairs of run-level features that do not combine, and why (checked in this order)."""


class OptionError(ConfigError):
    """A bad algorithm option, named the way whoever passed it wrote it.

    The message names options in braces: `OptionError("{sync_every} must be at least 1, got 0")`.
    Raised from Python (an algorithm's constructor, its Options) it reads "sync_every must be at
    least 1, got 0"; the CLI reads `as_flags()`: "--sync-every must be at least 1, got 0".
    `{name=}` also gives the value, from `values`: `OptionError("{overlap=} must be below 2",
    overlap=3)` reads "overlap=3 must be below 2", and on the CLI "--overlap 3 must be below 2".
    """

    _FIELD = re.compile(r"\{(\w+)(=?)\}")

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self._render(lambda name: name, "{}={}"))

    def as_flags(self) -> str:
        """The message with every option named as its CLI flag."""
        return self._render(_flag, "{} {}")

    def _render(self, name_of: Callable[[str], str], with_value: str) -> str:
        def field(m: re.Match) -> str:
            name = name_of(m.group(1))
            return with_value.format(name, self.values[m.group(1)]) if m.group(2) else name

        return self._FIELD.sub(field, self.template)


def check_bits(bits: Any) -> None:
    """An OptionError naming `bits` unless it names a codec (lowband.comm.get_codec)."""
    from lowband.comm import get_codec

    try:
        get_codec(bits)
    except ConfigError:
        raise OptionError(
            "{bits=} is not a codec: expected 32, 16, 8 or 4 (or fp32, bf16, fp16, int8, int4)",
            bits=bits,
        ) from None


@contextlib.contextmanager
def _as_flags() -> Iterator[None]:
    """Around the CLI's conversion of cfg.options to objects: option errors name flags."""
    try:
        yield
    except OptionError as e:
        raise ConfigError(e.as_flags()) from None


def register(cls: type[Algorithm]) -> None:
    """Called by Algorithm.__init_subclass__ for every class that defines `name`."""
    other = ALGORITHMS.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise RuntimeError(
            f"two algorithms are named {cls.name!r}: {other.__module__}.{other.__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__}"
        )
    options = cls.Options
    if not dataclasses.is_dataclass(options) or not all(
        f.kw_only for f in dataclasses.fields(options)
    ):
        raise RuntimeError(f"{cls.__qualname__}.Options must be a kw_only dataclass")
    ALGORITHMS[cls.name] = cls
    _check_option_types()


def discover() -> dict[str, type[Algorithm]]:
    """Import every module of lowband.algorithms (each registers what it defines)."""
    import lowband.algorithms as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    return ALGORITHMS


def get(name: str) -> type[Algorithm]:
    discover()
    if name == "dadao":  # it replaces the optimizer and needs mu, L: docs/decentralized.md
        raise ConfigError(
            "DADAO is not a `lowband train` algorithm (it needs a smooth strongly convex problem "
            "and replaces the optimizer): run `lowband dadao --topology ... --gossip-rates sdp`"
        )
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def option_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Option name -> [(algorithm name, its field)], over every registered algorithm."""
    out: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name, cls in ALGORITHMS.items():
        for f in dataclasses.fields(cls.Options):
            out.setdefault(f.name, []).append((name, f))
    return out


def _check_option_types() -> None:
    for option, owners in option_fields().items():
        types = {str(f.type) for _, f in owners}
        if len(types) > 1:
            raise RuntimeError(
                f"option {option!r} has different types in "
                + ", ".join(f"{a} ({f.type})" for a, f in owners)
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_options(cfg: TrainConfig) -> Any:
    """cfg.algo's Options, from the options given (cfg.options) and the defaults; validated."""
    cls = get(cfg.algo)
    own = {f.name for f in dataclasses.fields(cls.Options)}
    for key in cfg.options:
        if key not in own:
            owners = [a for a, _ in option_fields().get(key, [])]
            if not owners:
                raise ConfigError(f"unknown algorithm option {_flag(key)}")
            raise ConfigError(f"{_flag(key)} applies to --algo {', '.join(owners)}, not {cfg.algo}")
    for key, value in cfg.options.items():  # NaN passes many a range check: refuse it here
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(key)} must be a finite number, got {value}")
    try:
        with _as_flags():
            return cls.Options(**cfg.options)
    except TypeError as e:  # a value of the wrong type from a hand-written config
        raise ConfigError(f"options of --algo {cfg.algo}: {e}") from None


def check(cfg: TrainConfig) -> Any:
    """Refuse, with a reason, any combination that cannot run; return the resolved options."""
    from lowband.algorithms.robust import check_robust_options, gathers_updates
    from lowband.seqpar.train import check_options as check_seqpar_options

    cls = get(cfg.algo)
    options = resolve_options(cfg)
    if hasattr(cls, "check_run"):  # checks needing run-level values (e.g. a graph over --workers)
        cls.check_run(cfg, options)
    wanted = {
        "robust": gathers_updates(cfg),
        "stragglers": cfg.stragglers > 0,
        "straggler_delay": cfg.straggler_delay > 0 or cfg.slow_workers is not None,
        "seq_parallel": cfg.seq_parallel is not None,
        "elastic": cfg.elastic,
        "compile": cfg.compile is True,
        "compress": cfg.options.get("compress") is not None,
        "link_map": getattr(cfg, "link_map", None) is not None,
    }
    for feature, on in wanted.items():
        if on and feature not in EVERY_ALGORITHM and feature not in cls.supports:
            able = [n for n, c in ALGORITHMS.items() if feature in c.supports]
            raise ConfigError(
                f"{FEATURES[feature]} apply to --algo {', '.join(able)}, not {cfg.algo}"
            )
    for a, b, reason in CONFLICTS:
        if wanted[a] and wanted[b]:
            raise ConfigError(f"{FEATURES[a]} does not combine with {FEATURES[b]}: {reason}")
    check_robust_options(cfg)
    check_seqpar_options(cfg)
    _check_partition(cfg)
    if cfg.elastic:
        if cfg.device == "cuda":
            raise ConfigError("--elastic runs on Gloo (CPU tensors) for now; drop --device cuda")
        if wanted["robust"]:
            from lowband.robust import check_tolerance

            try:  # every committed round has at least --min-workers members
                check_tolerance(cfg.aggregate, cfg.min_workers, cfg.byzantine_tolerance)
            except ConfigError as e:
                raise ConfigError(
                    f"--elastic with --aggregate {cfg.aggregate}: --min-workers "
                    f"{cfg.min_workers} is too few for the rule ({e})"
                ) from None
    return options


def _check_partition(cfg: TrainConfig) -> None:
    """--partition parses, and a split by documents is not combined with gradient coding, whose
    coded parts are iid shards (lowband.data.partition)."""
    from lowband.data.partition import PartitionSpec

    spec = PartitionSpec.parse(getattr(cfg, "partition", "iid"))
    if spec.kind != "iid" and cfg.stragglers > 0:
        raise ConfigError(
            f"--partition {spec} does not combine with --stragglers: gradient coding recomputes "
            "other workers' parts from the iid shards"
        )


@dataclasses.dataclass
class Setup:
    """The run-level pieces an algorithm may take when a run builds it (`from_options`)."""

    seed: int = 0
    reducer: Callable[[Codec], Any] = lambda codec: None
    """The robust all-gather + rule for a codec, or None (--aggregate mean without --attack)."""
    injector: Any = None
    """lowband.coding.StragglerInjector: emulated slow workers (--straggler-delay), or None."""
    code: Any = None
    """lowband.coding.GradientCode for --stragglers, or None."""


def build(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    group: Comm | SyncGroup,
    *,
    index: int | None = None,
) -> Algorithm:
    """The algorithm of cfg, on `group` (a Comm or a SyncGroup). `index`: this worker's fixed
    number (default: its rank), which decides whether it is one of the simulated attackers."""
    from lowband.algorithms.robust import (
        build_code,
        build_injector,
        build_reducer,
        label_flip_classes,
    )
    from lowband.comm.sync import as_sync_group

    options = check(cfg)
    sync = as_sync_group(group)
    index = sync.comm.rank if index is None else index
    setup = Setup(
        seed=cfg.seed,
        reducer=lambda codec: build_reducer(cfg, sync.comm, codec),
        injector=build_injector(cfg, cfg.workers),
        code=build_code(cfg, cfg.workers) if cfg.stragglers > 0 else None,
    )
    with _as_flags():  # a check the constructor makes on the model (e.g. --fragments)
        algo = get(cfg.algo).from_options(model, optimizer, sync, options, setup)
    algo.flip_labels = label_flip_classes(cfg, model, index, cfg.workers)
    return algo


__all__ = [
    "ALGORITHMS",
    "OptionError",
    "Setup",
    "build",
    "check",
    "check_bits",
    "discover",
    "get",
    "option_fields",
]
