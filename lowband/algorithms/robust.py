"""--aggregate, --attack and --stragglers: lowband.robust and lowband.coding wired into training.

Which algorithms take them is declared on each algorithm (`supports`) and checked in
lowband.algorithms.registry.check; this module checks the features' own values.

Attacker ranks are the LAST `--attackers` ranks (n - a .. n - 1) by default, so rank 0, which
writes the run's summary and the progress bar, stays honest; `--attackers-at first|random` puts
them elsewhere, so that no measurement depends on where the attackers sit. Update attacks (sign-flip, ipm, alie,
gaussian, random) are simulated omnisciently, as in the papers: the updates are all-gathered and
every rank replaces the attackers' rows with attack(honest rows) before aggregating
(lowband.robust.collective), so the mean, too, goes through the all-gather under an attack.
label-flip is data level: the attackers' samplers flip their targets (Algorithm.wrap_sampler) and
the update they send is honestly computed from the flipped data.
"""

from __future__ import annotations

import random

from torch import nn

from lowband.coding import GradientCode, StragglerInjector, get_code
from lowband.comm import Codec, Comm
from lowband.config import TrainConfig
from lowband.errors import ConfigError
from lowband.robust import ATTACKS, RobustReducer, get_aggregator, get_attack

ATTACK_NAMES = ("sign-flip", "ipm", "alie", "gaussian", "random", "nan", "inf", "label-flip")


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


ATTACKERS_AT = ("last", "first", "random")


def attacker_ranks(world: int, attackers: int, at: str = "last", seed: int = 0) -> list[int]:
    """The workers that run --attack: the last `attackers` (default), the first, or a random
    set drawn from the seed (the same on every worker)."""
    if at == "first":
        return list(range(attackers))
    if at == "random":
        return sorted(random.Random(f"attackers:{seed}").sample(range(world), attackers))
    return list(range(world - attackers, world))


def robust_label(cfg: dict) -> str | None:
    """A short description of the run's robust settings (console, report), or None."""
    agg, attack = cfg.get("aggregate", "mean"), cfg.get("attack")
    if _key(agg) in ("mean", "avg", "average") and attack is None:
        return None
    out = (
        agg
        if _key(agg) in ("mean", "avg", "average")
        else f"{agg} f={cfg.get('byzantine_tolerance', 0)}"
    )
    if attack is not None:
        out += f" vs {attack} x{cfg.get('attackers', 0)} ({cfg.get('attackers_at', 'last')})"
    return out


def update_attack(cfg: TrainConfig) -> str | None:
    """The attack on updates, or None (no attack, or label-flip, which attacks the data)."""
    if cfg.attack is None or _key(cfg.attack) == "label_flip":
        return None
    return cfg.attack


def gathers_updates(cfg: TrainConfig) -> bool:
    """Whether updates travel by all-gather: a robust rule, or an attack that replaces updates."""
    return _key(cfg.aggregate) not in ("mean", "avg", "average") or update_attack(cfg) is not None


def check_robust_options(cfg: TrainConfig) -> None:
    """One-line ConfigErrors for impossible --aggregate/--attack/--stragglers combinations."""
    n, f, a, s = cfg.workers, cfg.byzantine_tolerance, cfg.attackers, cfg.stragglers
    robust = _key(cfg.aggregate) not in ("mean", "avg", "average")
    if not isinstance(f, int) or f < 0:
        raise ConfigError(f"--byzantine-tolerance must be 0 or more, got {f}")
    if f and not robust:
        raise ConfigError(
            "--byzantine-tolerance needs a robust --aggregate (the mean tolerates none)"
        )
    if f and 2 * f >= n:
        raise ConfigError(f"--byzantine-tolerance {f} needs 2f < --workers {n}")
    get_aggregator(cfg.aggregate, f=f, n=n)  # unknown names and the rule's own precondition

    if cfg.attack is not None:
        if _key(cfg.attack) not in {*ATTACKS, "label_flip", "signflip", "sf", "noise"}:
            raise ConfigError(
                f"unknown --attack {cfg.attack!r}; choose one of: {', '.join(ATTACK_NAMES)}"
            )
        if update_attack(cfg) is not None:
            get_attack(cfg.attack)
        if a < 1:
            raise ConfigError(f"--attack {cfg.attack} needs --attackers 1 or more")
    if cfg.krum_neighbours not in ("paper", "byzfl"):
        raise ConfigError(f"--krum-neighbours must be paper or byzfl, got {cfg.krum_neighbours!r}")
    if cfg.krum_neighbours != "paper" and _key(cfg.aggregate) not in ("krum", "multi_krum"):
        raise ConfigError("--krum-neighbours applies to --aggregate krum or multi-krum")
    if cfg.attackers_at not in ATTACKERS_AT:
        raise ConfigError(
            f"--attackers-at must be one of {', '.join(ATTACKERS_AT)}, got {cfg.attackers_at!r}"
        )
    if a < 0 or (a > 0 and cfg.attack is None):
        raise ConfigError(f"--attackers {a} needs an --attack (and must be 0 or more)")
    if a > 0 and a >= n:
        raise ConfigError(
            f"--attackers {a} must be fewer than --workers {n} (one honest worker at least)"
        )

    if s < 0:
        raise ConfigError(f"--stragglers must be 0 or more, got {s}")
    if s > 0:
        build_code(cfg, n)
    elif cfg.gradient_code is not None:
        raise ConfigError("--gradient-code needs --stragglers 1 or more")
    if cfg.straggler_delay < 0:
        raise ConfigError(f"--straggler-delay must be 0 or more seconds, got {cfg.straggler_delay}")
    k = cfg.slow_workers
    if k is not None and not 0 <= k <= n:
        raise ConfigError(f"--slow-workers must be in 0..--workers {n}, got {k}")
    if cfg.straggler_delay > 0 and (k if k is not None else s) == 0:
        raise ConfigError("--straggler-delay needs --slow-workers (or --stragglers) 1 or more")
    if k and cfg.straggler_delay == 0:
        raise ConfigError("--slow-workers needs a --straggler-delay above 0")


def build_code(cfg: TrainConfig, n: int) -> GradientCode:
    """The (n, s) gradient code of --gradient-code (default: fr if s + 1 divides n, else cyclic).

    The cyclic code's random matrix uses seed 0, the seed tests/test_coding.py vets for every
    survivor set; it does not follow --seed.
    """
    s = cfg.stragglers
    name = cfg.gradient_code or ("fr" if n % (s + 1) == 0 else "cyclic")
    return get_code(name, n, s, seed=0)


def build_injector(cfg: TrainConfig, n: int) -> StragglerInjector | None:
    """Exactly --slow-workers (default --stragglers) ranks late by --straggler-delay each step."""
    k = cfg.slow_workers if cfg.slow_workers is not None else cfg.stragglers
    if cfg.straggler_delay <= 0 or k == 0:
        return None
    return StragglerInjector(n, p=1.0, delay_s=cfg.straggler_delay, max_stragglers=k, seed=cfg.seed)


def build_reducer(cfg: TrainConfig, comm: Comm, codec: Codec) -> RobustReducer | None:
    """The all-gather + rule that replaces the averaging reduction, or None (the default path).

    The attackers are workers (the last --attackers of --workers), whatever rank an elastic
    round gives them; the rule is set up for --workers."""
    if not gathers_updates(cfg):
        return None
    return RobustReducer(
        comm,
        cfg.aggregate,
        cfg.byzantine_tolerance,
        codec,
        attack=update_attack(cfg),
        attackers=attacker_ranks(cfg.workers, cfg.attackers, cfg.attackers_at, cfg.seed),
        seed=cfg.seed,
        world_size=cfg.workers,
        options=_rule_options(cfg),
    )


def _rule_options(cfg: TrainConfig) -> dict:
    """Keyword arguments of the rule itself, from the run's flags."""
    if _key(cfg.aggregate) in ("krum", "multi_krum"):
        return {"slack": 1 if cfg.krum_neighbours == "byzfl" else 2}
    return {}


def label_flip_classes(cfg: TrainConfig, model: nn.Module, rank: int, world: int) -> int | None:
    """The class count whose targets this rank flips under --attack label-flip, else None."""
    if cfg.attack is None or _key(cfg.attack) != "label_flip":
        return None
    if rank not in attacker_ranks(world, cfg.attackers, cfg.attackers_at, cfg.seed):
        return None
    classes = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if classes is None:
        raise ConfigError("--attack label-flip needs a model with cfg.vocab_size (the classes)")
    return int(classes)
