"""What a technique costs in loss: the measured gap to DDP at equal tokens, and the tokens it needs
to close it.

The gaps are this library's own measurements (benchmarks/RESULTS.md), never guessed: the fair
study ("Fair study: best of 3 learning rates per method", 125m, 4 workers, 20M tokens, H=32, the
same 3 learning rates tried for every method, best trial each). A technique takes the entry of
its family; where no entry fits, the gap is reported as unmeasured and taken as 0 (said so).

The federated and decentralized rules were measured on the 1m model against other references,
so their gaps are chained onto DiLoCo's fair-study gap (1 + g = (1 + g_DiLoCo) x the rule's loss
over its reference's, at equal tokens):
  * gossip (D-PSGD, DFedSAM-MGS on a ring and an exponential graph): the iid table of
    "Decentralized training over a graph" (8 workers, 120 steps, H = 10) measures them against
    DiLoCo at H = 10: a measured ratio to DiLoCo. DFedSAM (Q = 1) has no iid run: D-PSGD's gap on
    the same graph stands in; any other graph takes the ring's.
  * federated: "Federated rules, re-measured on the global held-out split" (8 workers, by-source,
    half participation, 16 rounds of 10 steps) measures every rule against FedAvg, but FedAvg was
    never run beside DDP or DiLoCo: DiLoCo's gap stands in for FedAvg's (FedAvg is DiLoCo with an
    outer SGD step of lr 1 and no momentum, on a star), marked unmeasured.

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

from lowband.plan.cost import FEDERATED, GOSSIP, Technique

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


_GOSSIP_STUDY = "benchmarks/RESULTS.md, decentralized iid table: 1m, 8 workers, 120 steps, H=10"
GOSSIP_LOSS = {
    "diloco": 2.5717,
    ("dpsgd", "ring"): 2.4242,
    ("dpsgd", "exponential"): 2.3993,
    ("dfedsam-mgs", "ring"): 2.4008,
    ("dfedsam-mgs", "exponential"): 2.3958,
}
"""Eval loss at equal tokens (245,760) in the iid gossip study: DiLoCo H=10 and the graph rules
(DFedSAM-MGS with Q = 4)."""
_FED_STUDY = (
    "benchmarks/RESULTS.md, federated rules on the global held-out split: 1m, 8 workers, "
    "by-source, half participation, 16 rounds of 10 steps"
)
FEDERATED_LOSS = {
    "fedavg": 2.7583,
    "fedprox": 2.7731,
    "scaffold": 2.9616,
    "scallion": 2.8860,
    "scafcom": 3.2515,
    "admm-nr": 3.8395,
}
"""Final eval loss of each federated rule in that study (SCALLION randk 5%, alpha 0.05, server
Adam, local lr 0.003; SCAFCOM topk 5%, beta 1, server Adam, local lr 0.003; ADMM-NR rho 10, mean
gradient): the configurations `lowband plan` proposes."""


def _chained(base: Gap, ratio: float, source: str, measured: bool) -> Gap:
    return Gap((1.0 + base.relative) * ratio - 1.0, source, measured=measured)


def gossip_gap(t: Technique) -> Gap:
    """D-PSGD / DFedSAM / DFedSAM-MGS: DiLoCo's gap times the measured loss over DiLoCo's."""
    algo = "dpsgd" if t.algo == "dfedsam" else t.algo
    topo = t.topology if (algo, t.topology) in GOSSIP_LOSS else "ring"
    ratio = GOSSIP_LOSS[(algo, topo)] / GOSSIP_LOSS["diloco"]
    text = f"{algo} {topo} {100 * (ratio - 1):+.1f}% vs DiLoCo H=10 ({_GOSSIP_STUDY}), chained "
    text += "onto DiLoCo's fair-study gap"
    measured = algo == t.algo and topo == t.topology
    if algo != t.algo:
        text = f"dfedsam: no iid run, D-PSGD's stands in: {text}"
    if topo != t.topology:
        text = f"{t.topology}: not measured, the ring's stands in: {text}"
    return _chained(MEASURED["diloco"], ratio, text, measured)


def federated_gap(t: Technique) -> Gap:
    """A federated rule: DiLoCo's gap standing in for FedAvg's, times the rule's measured loss
    over FedAvg's (unmeasured: FedAvg never ran beside DDP or DiLoCo)."""
    ratio = FEDERATED_LOSS[t.algo] / FEDERATED_LOSS["fedavg"]
    text = "FedAvg vs DDP: not measured, DiLoCo's fair-study gap stands in"
    if t.algo != "fedavg":
        text += f", times {t.algo}'s {100 * (ratio - 1):+.1f}% over FedAvg ({_FED_STUDY})"
    return _chained(MEASURED["diloco"], ratio, text, measured=False)


def gap(t: Technique) -> Gap:
    """The measured gap of the technique's family (DDP at 8 bits: unmeasured, taken as 0; NoLoCo
    and CO2: unmeasured, DiLoCo's; federated and gossip rules: chained, module docstring)."""
    if t.algo in FEDERATED:
        return federated_gap(t)
    if t.algo in GOSSIP:
        return gossip_gap(t)
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


def _pct(g: Gap) -> str:
    return f"{100 * g.relative:+.0f}%"


_T = Technique
ASSUMPTION = (
    "loss: each technique's gap to DDP at equal tokens is this library's measurement for its "
    "family (fair study: 125m, 20M tokens, H=32; DiLoCo +32%, Streaming DiLoCo +14%, SparseLoCo "
    "+39%), whatever your H and size; 'to DDP's loss' multiplies the tokens by (1 + gap)^(1/0.28) "
    "(loss ~ tokens^-0.28, Hoffmann et al. 2022): an extrapolation, likely pessimistic at larger "
    "models (Charles et al. 2025 find the gap shrinks with size). Gossip rules: DiLoCo's gap "
    "times their measured loss over DiLoCo H=10's (1m, 8 workers, 120 steps, iid; D-PSGD "
    f"ring {_pct(gossip_gap(_T('dpsgd')))}, exponential "
    f"{_pct(gossip_gap(_T('dpsgd', topology='exponential')))}; DFedSAM-MGS Q=4 ring "
    f"{_pct(gossip_gap(_T('dfedsam-mgs')))}, exponential "
    f"{_pct(gossip_gap(_T('dfedsam-mgs', topology='exponential')))}; DFedSAM: no iid run, "
    "D-PSGD's stands in; measured at 32 bits, proposed at 16). Federated rules: not measured "
    "against DDP or DiLoCo, so DiLoCo's gap stands in for FedAvg's, times each rule's measured "
    "loss over FedAvg's (1m, 8 workers, by-source, half participation, 16 rounds: FedAvg "
    f"{_pct(federated_gap(_T('fedavg')))}, FedProx {_pct(federated_gap(_T('fedprox')))}, "
    f"SCAFFOLD {_pct(federated_gap(_T('scaffold')))}, SCALLION "
    f"{_pct(federated_gap(_T('scallion')))}, SCAFCOM {_pct(federated_gap(_T('scafcom')))}, "
    f"ADMM-NR {_pct(federated_gap(_T('admm-nr')))}), extrapolated. Rank by --rank budget to "
    "ignore it"
)
