"""DFedSAM and DFedSAM-MGS (Shi et al. 2023, arXiv 2302.04083): D-PSGD with SAM local steps, and
with Q gossip steps per round.

One rule, lowband/algorithms/dpsgd.py; these classes only name it and declare its options:
  * dfedsam: K local SAM steps (perturbation radius rho = sam_rho: the gradient is taken at
    x + rho * g / ||g||_2 on the same batch), then one gossip step x_i <- sum_j W[i, j] x_j;
  * dfedsam-mgs: the same with Q = gossip_steps gossip steps per round (x <- W^Q x), Q times the
    bytes of a round on every edge.
With sam_rho = 0 DFedSAM is D-PSGD exactly; on the complete graph, or as Q grows on any connected
graph (W^Q -> 11^T/n), a round ends with every worker at the average of the local SAM models, the
centralised (FedSAM) server step. docs/decentralized.md gives the defaults and what the tests check.
"""

from __future__ import annotations

import dataclasses

from lowband.algorithms.dpsgd import DPSGD, DPSGDOptions
from lowband.algorithms.registry import OptionError

__all__ = ["DFedSAM", "DFedSAMMGS", "DFedSAMOptions", "DFedSAMMGSOptions"]


@dataclasses.dataclass(kw_only=True)
class DFedSAMOptions(DPSGDOptions):
    """Options of --algo dfedsam."""

    sync_every: int = 5
    """Local steps per round (K): the gossip runs after every K inner steps."""
    sam_rho: float = 0.05
    """SAM's perturbation radius rho (0: plain D-PSGD local steps)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.sam_rho <= 10.0:
            raise OptionError(f"{{sam_rho}} must be in [0, 10], got {self.sam_rho}")


@dataclasses.dataclass(kw_only=True)
class DFedSAMMGSOptions(DFedSAMOptions):
    """Options of --algo dfedsam-mgs."""

    gossip_steps: int = 4
    """Gossip steps per round (Q): x <- W^Q x, Q exchanges with the neighbours."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.gossip_steps <= 1000:
            raise OptionError(f"{{gossip_steps}} must be in [1, 1000], got {self.gossip_steps}")


class DFedSAM(DPSGD):
    """DFedSAM: SAM local steps, then one gossip average (module docstring)."""

    name = "dfedsam"
    Options = DFedSAMOptions


class DFedSAMMGS(DPSGD):
    """DFedSAM-MGS: SAM local steps, then Q gossip steps (module docstring)."""

    name = "dfedsam-mgs"
    Options = DFedSAMMGSOptions
