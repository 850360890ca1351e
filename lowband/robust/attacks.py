"""Byzantine attacks for tests and simulated runs: f malicious updates from the honest ones.

Each attack is `attack(honest_HV, f, generator=None) -> (f, V)` (H = honest workers). The attackers
are omniscient, as in the papers: they see every honest update of the round before sending.

    name        malicious update                               source
    sign_flip   -mean(honest)                                  (ByzFL SignFlipping)
    ipm         -tau * mean(honest), tau = 2                   Xie, Koyejo, Gupta 2020 (IPM)
    alie        mean + tau * std (per coordinate), tau = 1.5   Baruch, Baruch, Goldberg 2019
                (tau=None: the paper's z_max, see alie_z_max)
    gaussian    N(mu, sigma^2 I), mu = 0, sigma = 1, per attacker   (ByzFL Gaussian)
    random      a uniformly random direction with the honest mean's norm (times scale), per
                attacker: a plausible-size update that carries no information
    nan         every entry NaN (what a diverged worker sends)          issue #20
    inf         every entry +inf                                         issue #20
    label_flip  data level, not here: attackers train on flip_labels(y, classes) and send an
                honest-looking update computed from it. A loader hook applies flip_labels to the
                attacker ranks' batches (the Byzantine rank's data loader, not the aggregator).

std is the sample standard deviation (n - 1 in the denominator), as in ByzFL. sign_flip, ipm,
alie, nan and inf send the same vector from every attacker (they agree); gaussian and random draw
one each. Every rule drops nan and inf rows before it runs (lowband.robust.aggregators.finite_rows),
so these two check that nothing non-finite reaches the model, or crashes a rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lowband.errors import ConfigError

__all__ = [
    "ATTACKS",
    "LabelFlipSampler",
    "alie",
    "alie_z_max",
    "apply_attack",
    "flip_labels",
    "gaussian",
    "get_attack",
    "inf_update",
    "ipm",
    "nan_update",
    "random_direction",
    "sign_flip",
]

Attack = Callable[..., Tensor]


def _repeat(v: Tensor, f: int) -> Tensor:
    return v.unsqueeze(0).expand(f, -1).clone()


def sign_flip(honest_HV: Tensor, f: int, generator: torch.Generator | None = None) -> Tensor:
    return _repeat(-honest_HV.mean(dim=0), f)


def ipm(
    honest_HV: Tensor, f: int, tau: float = 2.0, generator: torch.Generator | None = None
) -> Tensor:
    """Inner product manipulation: -tau times the honest mean (tau 2 as in ALGORITHMS.md)."""
    return _repeat(-tau * honest_HV.mean(dim=0), f)


def alie_z_max(n: int, f: int) -> float:
    """The paper's z_max: s = floor(n/2 + 1) - f workers must be won over; z = Phi^-1((n-s)/n)."""
    s = math.floor(n / 2 + 1) - f
    return float(torch.special.ndtri(torch.tensor((n - s) / n, dtype=torch.float64)))


def alie(
    honest_HV: Tensor,
    f: int,
    tau: float | None = 1.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A little is enough: mean + tau * std per coordinate (tau=None: alie_z_max(n, f))."""
    h = honest_HV.shape[0]
    if tau is None:
        tau = alie_z_max(h + f, f)
    mu = honest_HV.mean(dim=0)
    # Two-pass sample std: torch's std(dim=0) over the short axis is ~7x slower on CPU at d = 1M.
    std = ((honest_HV - mu).square().sum(dim=0) / (h - 1)).sqrt() if h > 1 else torch.zeros_like(mu)
    return _repeat(mu + tau * std, f)


def gaussian(
    honest_HV: Tensor,
    f: int,
    mu: float = 0.0,
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    d = honest_HV.shape[1]
    z = torch.randn(f, d, generator=generator, dtype=honest_HV.dtype, device="cpu")
    return (mu + sigma * z).to(honest_HV.device)


def random_direction(
    honest_HV: Tensor, f: int, scale: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    d = honest_HV.shape[1]
    z = torch.randn(f, d, generator=generator, dtype=honest_HV.dtype, device="cpu")
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-30)
    return (scale * torch.linalg.vector_norm(honest_HV.mean(dim=0)).cpu() * z).to(honest_HV.device)


def nan_update(honest_HV: Tensor, f: int, generator: torch.Generator | None = None) -> Tensor:
    """An update full of NaN, as from a worker whose loss diverged."""
    return honest_HV.new_full((f, honest_HV.shape[1]), float("nan"))


def inf_update(honest_HV: Tensor, f: int, generator: torch.Generator | None = None) -> Tensor:
    """An update full of +inf."""
    return honest_HV.new_full((f, honest_HV.shape[1]), float("inf"))


def flip_labels(targets: Tensor, num_classes: int) -> Tensor:
    """Label flipping, the data-level attack: class y becomes num_classes - 1 - y."""
    return num_classes - 1 - targets


class LabelFlipSampler:
    """A sampler whose batches carry flipped targets: the loader hook of the label_flip attack.

    Wraps anything with `batch(step) -> (x, y)` (lowband.data.ShardSampler); every other
    attribute is the wrapped sampler's.
    """

    def __init__(self, sampler: Any, num_classes: int) -> None:
        self.sampler, self.num_classes = sampler, num_classes

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        x, y = self.sampler.batch(step)
        return x, flip_labels(y, self.num_classes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


ATTACKS: dict[str, Attack] = {
    "sign_flip": sign_flip,
    "ipm": ipm,
    "alie": alie,
    "gaussian": gaussian,
    "random": random_direction,
    "nan": nan_update,
    "inf": inf_update,
}
"""name -> attack(honest_HV, f, generator=None, **options). label_flip is data level (flip_labels)."""

_ALIASES = {"signflip": "sign_flip", "sf": "sign_flip", "noise": "gaussian"}


def get_attack(name: str, **kwargs: Any) -> Attack:
    """The attack `name` with its options bound; ConfigError for unknown names or options."""
    key = name.strip().lower().replace("-", "_")  # CLI spelling: sign-flip
    key = _ALIASES.get(key, key)
    if key == "label_flip":
        raise ConfigError(
            "label_flip is a data-level attack: apply lowband.robust.attacks.flip_labels to the "
            "attacker ranks' batches in the loader, not to their updates"
        )
    if key not in ATTACKS:
        raise ConfigError(
            f"unknown attack {name!r}: expected one of {', '.join(sorted(ATTACKS))} or label_flip"
        )
    import inspect

    allowed = set(list(inspect.signature(ATTACKS[key]).parameters)[2:]) - {"generator"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ConfigError(
            f"attack {key} has no option(s) {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(allowed)) or 'none'}"
        )
    return functools.partial(ATTACKS[key], **kwargs)


def apply_attack(
    updates_NV: Tensor,
    attackers: Sequence[int],
    attack: Attack,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A copy of updates_NV whose attacker rows hold attack(honest rows, len(attackers))."""
    n = updates_NV.shape[0]
    bad = sorted(set(int(a) for a in attackers))
    if not bad:
        return updates_NV.clone()
    if bad[0] < 0 or bad[-1] >= n or len(bad) >= n:
        raise ConfigError(f"attackers {bad} must be distinct ranks in 0..{n - 1}, fewer than n")
    honest = [i for i in range(n) if i not in set(bad)]
    out = updates_NV.clone()
    out[bad] = attack(updates_NV[honest], len(bad), generator=generator).to(out.dtype)
    return out
