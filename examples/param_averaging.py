"""A new algorithm in one file: periodic parameter averaging ("local SGD"), for docs/architecture.md.

It is not part of the package; importing this file registers it, and it then runs like the
built-in ones: from `lowband.algorithms.build`, on a static group or an elastic one (its rounds
commit or roll back through the same five calls), with its own options as CLI flags.

    import examples.param_averaging  # registers --algo param-averaging
    lowband.cli.main(["train", "--algo", "param-averaging", "--average-every", "10", "--workers", "1"])

(A local launch of several workers starts fresh processes that import only the package, so there a
new algorithm belongs in lowband/algorithms/.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lowband.algorithms.base import Algorithm, ensure_same_start, flat_params, write_flat
from lowband.algorithms.registry import OptionError


@dataclasses.dataclass(kw_only=True)
class ParameterAveragingOptions:
    """Options of --algo param-averaging."""

    average_every: int = 10
    """Inner steps between two parameter averages."""

    def __post_init__(self) -> None:
        if (
            self.average_every < 1
        ):  # "average_every ..." from Python, "--average-every ..." on the CLI
            raise OptionError(f"{{average_every}} must be at least 1, got {self.average_every}")


class ParameterAveraging(Algorithm):
    """Every `average_every` steps, every worker takes the mean of all workers' parameters."""

    name = "param-averaging"
    Options = ParameterAveragingOptions

    def __init__(self, model, optimizer, group, **options: Any) -> None:
        super().__init__(model, optimizer, group)
        self.options = ParameterAveragingOptions(**options)
        self.params = [p for p in model.parameters() if p.requires_grad]
        ensure_same_start(self.comm, [[p.data for p in self.params]])
        self.average = flat_params(self.params)  # the last committed mean: what replicas share
        self.averages = 0

    def step(self) -> None:
        if self.joining:  # a newcomer in an elastic job: heal, then take part in the round
            self.join()
            return
        super().step()
        if self.local_step % self.options.average_every == 0:
            self._sync_round(self.local_step)

    @torch.no_grad()
    def _continue_round(self, round_: Any) -> None:
        mine = flat_params(self.params).mul_(self.sync.scale)  # 0 for a worker that just healed
        try:
            self.comm.all_reduce(mine, op="avg")
        except Exception as e:  # noqa: BLE001 - static: raised again; elastic: the round fails
            self.sync.report(e)
        if self.sync.commit():
            self.average = mine
            self.averages += 1
            write_flat(self.params, self.average)
            self.sync.committed(self, self.local_step)  # parity of the shared state, elastic
        else:
            write_flat(self.params, self.average)  # roll back to the last committed mean
            self.sync.discarded("average", self.local_step, "not committed")

    def shared_state(self) -> list[torch.Tensor]:
        return [self.average]

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "outer_step": self.averages}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average.clone(), "averages": self.averages}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.average = state["average"].clone()
        self.averages = int(state["averages"])
