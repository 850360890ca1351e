"""lowband's federated rules as Flower strategies (docs/federated.md, "Flower").

Flower (`flwr`, the `flower` extra) ships FedAvg, FedProx, FedAdam and robust rules but no
SCAFFOLD. Here each rule of lowband.algorithms.{federated,scaffold,admm_nr} is a strategy of
Flower's Message API (`flwr.serverapp.strategy`, flwr >= 1.21; the `flwr.server.strategy`
Fit/Evaluate API is Flower's legacy one), a subclass of Flower's own FedAvg, so that
`strategy.start(grid, initial_arrays, num_rounds)`, federated evaluation and logging are Flower's:

    fedavg, fedprox, scaffold, scallion, scafcom, admm-nr  ->  STRATEGIES[name]

One round r (Flower's `server_round`):
  1. `configure_train`: the round's clients S_r = `participants(sorted node ids, M, seed, r)`
     (lowband.algorithms.federated: reproducible from the seed, unlike Flower's random.sample).
     Each gets the model x ("arrays"), the rule's settings ("config", keys "lowband.*") and its
     extra downlink: c for the SCAFFOLD family; for ADMM-NR the model at the end of the client's
     last participation when that was not the previous round (a Flower client hears from the
     server only when drawn, where lowband's star sends x to every client every round).
  2. The ClientApp trains from `FlowerClient.start`, passing every gradient through
     `FlowerClient.correct(y, g)`, and answers with `FlowerClient.reply(y)`:
        fedavg, fedprox     "arrays" = y_i
        scaffold            "arrays" = y_i, "lowband.dc" = c_i+ - c_i      (two uplink vectors)
        scallion, scafcom   "lowband.delta" = C(Delta_i) as the compressor's wire tensors
        admm-nr             "lowband.s" = s_i
     Client state (c_i, v_i, ADMM-NR's copies and local model) stays in `context.state`.
  3. `aggregate_train`: the valid replies are decoded and averaged unweighted over S_r (the
     papers' mean; Flower's FedAvg weights by "num-examples"), and the rule's pure server step
     from lowband.algorithms updates x (and c, the ADMM-NR table). A client whose reply failed
     is a non-participant of the round.

Differences from `lowband train`: no link noise, and ADMM-NR's unselected clients idle (Flower
sends them nothing) instead of stepping towards their last anchor.

Modules: `records` (flat vectors <-> Flower ArrayRecords, compressed payloads), `strategies`
(the server side: one Strategy per rule, `STRATEGIES`, `strategy()`) and `client`
(`FlowerClient`, the client side).
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as e:  # the extra is optional; say how to get it
    raise ImportError(
        "lowband.flower needs Flower (flwr >= 1.42): pip install 'lowband[flower]'"
    ) from e

from lowband.flower.client import FlowerClient
from lowband.flower.records import flatten, unflatten
from lowband.flower.strategies import (
    STRATEGIES,
    AdmmNrStrategy,
    FedAvgStrategy,
    FedProxStrategy,
    LowbandStrategy,
    ScafcomStrategy,
    ScaffoldStrategy,
    ScallionStrategy,
    strategy,
)

__all__ = [
    "STRATEGIES",
    "AdmmNrStrategy",
    "FedAvgStrategy",
    "FedProxStrategy",
    "FlowerClient",
    "LowbandStrategy",
    "ScafcomStrategy",
    "ScaffoldStrategy",
    "ScallionStrategy",
    "flatten",
    "strategy",
    "unflatten",
]
