"""What a technique costs in loss: the measured gap to DDP at equal tokens, and the tokens it needs
to close it.

The gaps are this library's own measurements (benchmarks/RESULTS.md), never guessed: the fair
study ("Fair study: best of 3 learning rates per method", 125m, 4 workers, 20M tokens, H=32, the
same 3 learning rates tried for every method, best trial each). A technique takes the entry of
its family; where no entry fits, the gap is reported as unmeasured and taken as 0 (said so).

Turning a gap into tokens needs a law for loss against data. We take L(D) = L_inf + B D^-beta
with beta = 0.28, the data exponent of Hoffmann et al. 2022 ("Training Compute-Optimal Large
Language Models", approach 3), and assume the gap sits in the reducible part B D^-beta, so a
technique whose loss at D tokens is (1 + g) times DDP's reaches DDP's loss after (1 + g)^(1/beta)
x D tokens. That is an extrapolation (our gaps are measured at one size and budget; the DiLoCo
scaling-law work of Charles et al. 2025 reports gaps that shrink as models grow), printed with
every plan, and it is pessimistic where the gap is partly irreducible noise.
"""

from __future__ import annotations

import dataclasses

from lowband.plan.cost import Technique

DATA_EXPONENT = 0.28
"""beta in L(D) = L_inf + B D^-beta (Hoffmann et al. 2022)."""

_FAIR_STUDY = "fair study (125m, 20M tokens, H=32, best of 3 lrs each; benchmarks/RESULTS.md)"


@dataclasses.dataclass(frozen=True)
class Gap:
    relative: float
    """Eval loss at equal tokens over DDP's, minus 1 (0.14: 14% higher)."""
    source: str
    measured: bool = True


MEASURED = {
    "ddp": Gap(0.0, "the reference"),
    "diloco": Gap(1.0977 / 0.8323 - 1, f"DiLoCo fp32, {_FAIR_STUDY}"),
    "streaming-diloco": Gap(0.9500 / 0.8323 - 1, f"Streaming DiLoCo 4-bit P=4, {_FAIR_STUDY}"),
    "sparse": Gap(1.1592 / 0.8323 - 1, f"SparseLoCo 2%/2-bit, {_FAIR_STUDY}"),
}
"""The fair study's best eval losses: DDP 0.8323, DiLoCo 1.0977, Streaming 0.9500, SparseLoCo
1.1592 (4-bit vs fp32 outer gradients measured 0.4% apart, so DiLoCo's gap stands for both)."""


def gap(t: Technique) -> Gap:
    """The measured gap of the technique's family (DDP at 8 bits: unmeasured, taken as 0; NoLoCo
    and CO2: unmeasured, DiLoCo's)."""
    if t.algo == "ddp":
        if t.bits != 32:
            return Gap(0.0, "8-bit DDP gradients: not measured, taken as 0", measured=False)
        return MEASURED["ddp"]
    if t.compress:
        return MEASURED["sparse"]
    if t.algo in ("noloco", "co2"):  # not in the fair study: DiLoCo's gap stands in, said so
        d = MEASURED["diloco"]
        return Gap(d.relative, f"{t.algo}: not measured; DiLoCo's gap stands in", measured=False)
    return MEASURED[t.algo]


def token_multiplier(g: Gap) -> float:
    """Tokens needed to reach DDP's loss, over DDP's tokens: (1 + gap)^(1/beta)."""
    return (1.0 + max(0.0, g.relative)) ** (1.0 / DATA_EXPONENT)


ASSUMPTION = (
    "loss: each technique's gap to DDP at equal tokens is this library's measurement for its "
    "family (fair study: 125m, 20M tokens, H=32; DiLoCo +32%, Streaming DiLoCo +14%, SparseLoCo "
    "+39%), whatever your H and size; 'to DDP's loss' multiplies the tokens by (1 + gap)^(1/0.28) "
    "(loss ~ tokens^-0.28, Hoffmann et al. 2022): an extrapolation, likely pessimistic at larger "
    "models (Charles et al. 2025 find the gap shrinks with size). Rank by --rank budget to ignore it"
)
