"""The server side: lowband's rules as Flower Message-API strategies (lowband.flower)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as _FlowerFedAvg

from lowband.algorithms.admm_nr import AdmmNrOptions, admm_nr_server_step
from lowband.algorithms.federated import (
    FederatedOptions,
    FedProxOptions,
    fedavg_server_step,
    participants,
)
from lowband.algorithms.scaffold import (
    ScafcomOptions,
    ScallionOptions,
    get_compressor,
    one_vector_server_step,
    scaffold_server_step,
)
from lowband.errors import ConfigError
from lowband.flower.records import decode, flatten, from_record, nbytes, to_record, unflatten


class LowbandStrategy(_FlowerFedAvg):
    """FedAvg's round with lowband's sampling and server step (module docstring); subclasses set
    `rule`, `Options` and the hooks. Options: the rule's lowband options (local_steps, server_lr,
    participation, clients_per_round, ...: same names, defaults and checks as `--algo`)."""

    rule: ClassVar[str] = "fedavg"
    Options: ClassVar[type] = FederatedOptions

    def __init__(
        self,
        *,
        seed: int = 0,
        fraction_evaluate: float = 0.0,
        min_available_nodes: int = 2,
        **options: Any,
    ) -> None:
        self.options = self.Options(**options)
        super().__init__(
            fraction_train=self.options.participation,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=max(1, self.options.clients_per_round),
            min_available_nodes=min_available_nodes,
        )
        self.seed = seed
        self.uplink_bytes = 0
        """Payload bytes received from clients over all rounds (only clients that replied)."""
        self.downlink_bytes = 0
        self.n = 0
        """N, the connected clients at the round's start (set min_available_nodes to the
        number of clients, so that round 1 waits for all of them)."""
        self._x: torch.Tensor | None = None
        self._like: ArrayRecord | None = None

    # -- what a rule defines --------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The rule's settings the clients need (sent as "lowband.*" config entries)."""
        return {"local-steps": self.options.local_steps}

    def downlink(self, node: int, server_round: int) -> dict[str, ArrayRecord]:
        """Extra records for `node` besides the model."""
        return {}

    def rows(self, content: RecordDict, node: int, server_round: int) -> list[torch.Tensor]:
        """A reply's payload vectors, decoded (FedAvg: [y_i - x])."""
        return [flatten(content["arrays"]) - self._x]

    def server_step(self, mean: list[torch.Tensor], rows: dict[int, list], server_round: int):
        """The new x from the round's mean rows (the rule's pure function)."""
        return fedavg_server_step(self._x, mean[0], self.options.server_lr)

    # -- Flower's hooks -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(1)  # as Flower's own sampling waits for its minimum of nodes
        self.n, self._like, self._x = len(nodes), arrays, flatten(arrays)
        chosen = participants(nodes, self.options.clients(self.n), self.seed, server_round)
        config["server-round"] = server_round
        config["lowband.rule"] = self.rule
        config["lowband.seed"] = self.seed
        for k, v in self.settings().items():
            config[f"lowband.{k}"] = v
        messages = []
        for node in chosen:
            extra = self.downlink(node, server_round)
            self.downlink_bytes += nbytes(arrays) + sum(nbytes(r) for r in extra.values())
            content = RecordDict({"arrays": arrays, "config": config, **extra})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid or self._x is None:
            return None, None
        rows, up = {}, 0
        for msg in sorted(valid, key=lambda m: m.metadata.src_node_id):
            node = msg.metadata.src_node_id
            rows[node] = self.rows(msg.content, node, server_round)
            up += sum(nbytes(r) for r in msg.content.array_records.values())
        mean = [torch.stack([r[k] for r in rows.values()]).mean(0) for k in range(len(rows[node]))]
        x = self.server_step(mean, rows, server_round)
        self.uplink_bytes += up
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        metrics["uplink-bytes"] = self.uplink_bytes
        metrics["downlink-bytes"] = self.downlink_bytes
        metrics["round-clients"] = len(rows)
        return unflatten(x, self._like), metrics


class FedAvgStrategy(LowbandStrategy):
    """FedAvg (McMahan et al. 2017), unweighted over the round's clients."""


class FedProxStrategy(LowbandStrategy):
    """FedProx (Li et al. 2020): FedAvg's server; clients add mu (y - x) to their gradients."""

    rule = "fedprox"
    Options = FedProxOptions

    def settings(self):
        return {**super().settings(), "mu": self.options.mu}


class ScaffoldStrategy(LowbandStrategy):
    """SCAFFOLD (Karimireddy et al. 2020, option II): downlink (x, c), uplink (y_i, dc_i)."""

    rule = "scaffold"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.c: torch.Tensor | None = None
        """The server control variate (zeros of x's shape at the first round)."""

    def downlink(self, node, server_round):
        if self.c is None:
            self.c = torch.zeros_like(self._x)
        return {"lowband.c": to_record([self.c])}

    def rows(self, content, node, server_round):
        return [flatten(content["arrays"]) - self._x, from_record(content["lowband.dc"])[0]]

    def server_step(self, mean, rows, server_round):
        x, self.c = scaffold_server_step(
            self._x, self.c, mean[0], mean[1], len(rows), self.n, self.options.server_lr
        )
        return x


class ScallionStrategy(ScaffoldStrategy):
    """SCALLION (Huang, Li and Li 2023): one compressed uplink vector (unbiased compressor)."""

    rule = "scallion"
    Options = ScallionOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compressor = get_compressor(self.options.compressor)
        if not self.compressor.unbiased and self.rule == "scallion":
            raise ConfigError(
                f"compressor={self.options.compressor} is biased; ScallionStrategy needs an "
                "unbiased one (identity, randk:F, qsgd:B), or use ScafcomStrategy"
            )
        self.adam: tuple | None = None

    @property
    def alpha(self) -> float:
        return self.options.cv_scale

    def settings(self):
        o = self.options
        return {**super().settings(), "compressor": o.compressor, "cv-scale": self.alpha}

    def rows(self, content, node, server_round):
        wire = from_record(content["lowband.delta"])
        gen = (self.seed, server_round, node)
        return [decode(self.compressor, wire, self._x.numel(), gen).to(self._x.dtype)]

    def server_step(self, mean, rows, server_round):
        o = self.options
        if o.server_opt == "adam" and self.adam is None:
            self.adam = (torch.zeros_like(self._x), torch.zeros_like(self._x), 0)
        x, self.c, self.adam = one_vector_server_step(
            self._x, self.c, mean[0], len(rows), self.n,
            step_size=o.server_lr * o.local_steps * o.local_lr, alpha=self.alpha, adam=self.adam,
        )  # fmt: skip
        return x


class ScafcomStrategy(ScallionStrategy):
    """SCAFCOM (Huang, Li and Li 2023): SCALLION's server, client momentum, biased compressors."""

    rule = "scafcom"
    Options = ScafcomOptions

    @property
    def alpha(self) -> float:
        return 1.0

    def settings(self):
        return {**super().settings(), "beta": self.options.beta}


class AdmmNrStrategy(LowbandStrategy):
    """ADMM-NR (Lari et al. 2024), dual-free: the server keeps every client's last payload."""

    rule = "admm-nr"
    Options = AdmmNrOptions

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table: dict[int, torch.Tensor] = {}
        """Each client's last payload s_i; a client never heard from counts as x^0."""
        self.z0: torch.Tensor | None = None
        self.ends: dict[int, tuple[int, torch.Tensor]] = {}
        """Per client: (round, z at its end) of its last participation."""

    def settings(self):
        o = self.options
        return {**super().settings(), "rho": o.rho, "grad-estimate": o.grad_estimate}

    def downlink(self, node, server_round):
        if self.z0 is None:
            self.z0 = self._x.clone()
        last = self.ends.get(node)
        return (
            {}
            if last is None or last[0] == server_round - 1
            else {"lowband.z-end": to_record([last[1]])}
        )

    def rows(self, content, node, server_round):
        return [from_record(content["lowband.s"])[0]]

    def server_step(self, mean, rows, server_round):
        known = sorted(set(self.table) | set(rows))
        index = {node: i for i, node in enumerate(known)}
        unseen = max(self.n - len(known), 0)  # clients never heard from hold s_j = x^0
        table = torch.stack([self.table.get(n, self.z0) for n in known] + [self.z0] * unseen)
        z, table = admm_nr_server_step(
            self._x, table, {index[n]: r[0] for n, r in rows.items()}, self.options.server_lr
        )
        self.table = {n: table[i] for n, i in index.items()}
        for node in rows:
            self.ends[node] = (server_round, z.clone())
        return z


STRATEGIES: dict[str, type[LowbandStrategy]] = {
    s.rule: s
    for s in (
        FedAvgStrategy,
        FedProxStrategy,
        ScaffoldStrategy,
        ScallionStrategy,
        ScafcomStrategy,
        AdmmNrStrategy,
    )
}


def strategy(name: str, **options: Any) -> LowbandStrategy:
    """The Flower strategy of --algo `name` with lowband's options (ConfigError if unknown)."""
    if name not in STRATEGIES:
        raise ConfigError(f"no Flower strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**options)


__all__ = [
    "STRATEGIES",
    "AdmmNrStrategy",
    "FedAvgStrategy",
    "FedProxStrategy",
    "LowbandStrategy",
    "ScafcomStrategy",
    "ScaffoldStrategy",
    "ScallionStrategy",
    "strategy",
]
