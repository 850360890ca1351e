"""Federated rounds on a star, and the two plainest rules on them: FedAvg and FedProx.

docs/federated.md gives every rule; this module holds what they share (`Federated`):

  1. Every K = --local-steps inner steps a round r opens (`_sync_round(r)`). Its participants
     S_r are drawn from (seed, r) over the round's members (`participants`), alike everywhere.
  2. Each participant computes its payload (`client_vectors`, then `encode`: a compressor may
     turn it into other tensors) and sends it to the server, rank 0 of the round's group, by
     point to point. Non-participants send nothing: uplink bytes are counted only for senders.
  3. The server decodes the rows, aggregates them (the mean, or the --aggregate rule on the
     first vector) and takes its step (`server_step`).
  4. The server sends the new state (`downlink`: x, and c for SCAFFOLD) to every other rank.
  5. Commit: the clients take the new state and apply their own updates (`finish`); every
     worker continues from x. A failed round (elastic) is rolled back: back to x, no client
     state changes.

Deadlock-freedom: in phase 2 the server only receives (from every participant but itself, in
ascending rank) and every participant but the server only sends; in phase 4 the server only sends
and every other rank only receives. Every send has exactly one matching receive with the same
(peer, tag), posted asynchronously, and no rank issues any other operation in between.

Replicas: the server holds x exactly; the others hold the copy they received (bit-identical
unless the link adds noise, which is the point of --link ...:noise=SIGMA).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start, flat_params, write_flat
from lowband.algorithms.registry import OptionError
from lowband.comm import Comm
from lowband.comm.sync import SyncGroup

SERVER = 0
"""The server's rank in every round's group."""


def participants(members: list[int], m: int, seed: int, round_: int) -> list[int]:
    """The M members (fixed worker indices) taking part in round `round_`, sorted; a pure
    function of (members, M, seed, round), so every worker draws the same set."""
    pool = sorted(members)
    m = min(max(1, m), len(pool))
    if m == len(pool):
        return pool
    rng = np.random.default_rng([seed, round_, 0x5CAF])
    return sorted(pool[i] for i in rng.choice(len(pool), size=m, replace=False))


@dataclasses.dataclass(kw_only=True)
class FederatedOptions:
    """Options every federated rule shares."""

    local_steps: int = 20
    """Local steps K per round: a round (sample, upload, server step, download) every K inner steps."""
    server_lr: float = 1.0
    """Server learning rate eta_g (1: FedAvg's x = mean of the clients' models)."""
    participation: float = 1.0
    """Fraction of the clients drawn (from --seed and the round) to take part in each round."""
    clients_per_round: int = 0
    """Clients drawn per round; 0: round(--participation x clients), at least 1."""

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise OptionError(f"{{local_steps}} must be at least 1, got {self.local_steps}")
        if not self.server_lr > 0:
            raise OptionError(f"{{server_lr}} must be positive, got {self.server_lr}")
        if not 0.0 < self.participation <= 1.0:
            raise OptionError(f"{{participation}} must be in (0, 1], got {self.participation}")
        if self.clients_per_round < 0:
            raise OptionError(
                f"{{clients_per_round}} must be at least 0, got {self.clients_per_round}"
            )

    def clients(self, n: int) -> int:
        """M, the participants per round among n clients."""
        if self.clients_per_round:
            return min(self.clients_per_round, n)
        return max(1, min(n, round(self.participation * n)))


class Federated(Algorithm):
    """The star round every federated rule shares (module docstring). Not registered itself."""

    Options: ClassVar[type] = FederatedOptions
    supports = frozenset({"robust"})
    keeps_local: ClassVar[bool] = False
    """Whether clients keep their local models across rounds (ADMM-NR) instead of returning to x."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group: Comm | SyncGroup,
        *,
        seed: int = 0,
        reducer: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(model, optimizer, group)
        self.options = opts = self.Options(**options)
        self.K, self.seed = opts.local_steps, seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        ensure_same_start(self.comm, [[p.data for p in self.params]])
        self.x = flat_params(self.params)
        """The server model x (the server's exact copy; a client's last received copy)."""
        self.reducer = reducer
        """--aggregate/--attack: the rule's settings (lowband.robust.RobustReducer), or None."""
        if reducer is not None:
            from lowband.robust import check_tolerance

            check_tolerance(reducer.aggregate, opts.clients(self.comm.size), reducer.f)
            self._rule = reducer._make()
        self.grad_sum = torch.zeros_like(self.x)
        """Sum of this round's raw local gradients (gbar_i = grad_sum / K)."""
        self.grad_steps = 0
        self.grad_last = torch.zeros_like(self.x)
        """The latest raw local gradient (ADMM-NR's estimate of grad f_i at its new model)."""
        self.rounds = 0
        self.uplink_bytes = 0
        """Bytes this worker sent as a client (its payloads); the server's own never travel."""
        self.downlink_bytes = 0
        self.last_participants: list[int] = []

    @classmethod
    def from_options(cls, model, optimizer, group, options, setup) -> Federated:
        reducer = setup.reducer(None)
        return cls(
            model,
            optimizer,
            group,
            seed=setup.seed,
            reducer=reducer,
            **dataclasses.asdict(options),
        )

    # -- hooks ----------------------------------------------------------------------------------
    def correction(self, y: torch.Tensor) -> torch.Tensor | None:
        """What the rule adds to the local gradient at y (flat), or None."""
        return None

    @torch.no_grad()
    def sync_gradients(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        g = torch.cat([t.detach().reshape(-1).float() for t in grads])
        self.grad_sum.add_(g)
        self.grad_steps += 1
        self.grad_last = g
        corr = self.correction(flat_params(self.params))
        if corr is not None:
            offset = 0
            for p in self.params:
                n = p.numel()
                c = corr[offset : offset + n].view_as(p).to(p.dtype)
                p.grad = c.clone() if p.grad is None else p.grad.add_(c)
                offset += n

    def step(self) -> None:
        if self.joining:
            self.join()
            return
        super().step()
        if self.local_step % self.K == 0:
            self._sync_round(self.local_step // self.K)

    # -- what a rule defines --------------------------------------------------------------------
    def gbar(self) -> torch.Tensor:
        """The mean raw local gradient of this round (SGD: (x - y)/(K eta_l) - c + c_i)."""
        return self.grad_sum / max(self.grad_steps, 1)

    def client_vectors(self, y: torch.Tensor, round_: int) -> list[torch.Tensor]:
        """The participant's payload vectors (flat fp32); FedAvg: [y - x]."""
        return [y - self.x]

    def encode(self, vectors: list[torch.Tensor], worker: int, round_: int) -> list[torch.Tensor]:
        """The tensors that travel (a compressor's encoding); identity by default."""
        return vectors

    def decode(self, wire: list[torch.Tensor], worker: int, round_: int) -> list[torch.Tensor]:
        return [t.float() for t in wire]

    def wire_like(self, worker: int, round_: int) -> list[torch.Tensor]:
        """Empty tensors shaped as `worker`'s wire payload (the server receives into them)."""
        return [torch.empty_like(self.x)]

    def server_step(self, agg: list[torch.Tensor], rows: dict[int, list[torch.Tensor]]) -> None:
        """FedAvg: x <- x + eta_g mean(y_i - x)."""
        self.x.copy_(fedavg_server_step(self.x, agg[0], self.options.server_lr))

    def downlink(self) -> list[torch.Tensor]:
        return [self.x]

    def take_downlink(self, tensors: list[torch.Tensor]) -> None:
        self.x.copy_(tensors[0])

    def finish(self, participant: bool, y: torch.Tensor) -> None:
        """After a committed round: the client's own state updates (participants only)."""

    # -- the round ------------------------------------------------------------------------------
    def _aggregate(
        self, rows: dict[int, list[torch.Tensor]], members: list[int]
    ) -> list[torch.Tensor]:
        """Mean of each vector over the rows; the --aggregate rule on the first one."""
        order = sorted(rows)
        out = []
        for k in range(len(rows[order[0]])):
            stacked = torch.stack([rows[r][k] for r in order])
            if k == 0 and self.reducer is not None:
                if self.reducer.attack is not None and self.reducer.attackers:
                    from lowband.robust.attacks import apply_attack

                    bad = [i for i, r in enumerate(order) if members[r] in self.reducer.attackers]
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds)
                    if bad and len(bad) < len(order):
                        stacked = apply_attack(stacked, bad, self.reducer.attack, gen)
                out.append(self._rule(stacked).to(torch.float32))
            else:
                out.append(stacked.mean(0))
        return out

    @torch.no_grad()
    def _continue_round(self, round_: int) -> None:
        round_ = self.local_step // self.K  # a heal moves this worker to its source's round
        comm, members = self.comm, self.sync.members
        chosen = participants(members, self.options.clients(comm.size), self.seed, round_)
        part = [r for r in range(comm.size) if members[r] in chosen]
        me = comm.rank
        y = flat_params(self.params)
        mine = part.count(me) > 0
        failed = False
        down: list[torch.Tensor] = []
        saved = self._server_snapshot() if me == SERVER else None
        try:
            wire = self.encode(self.client_vectors(y, round_), members[me], round_) if mine else []
            if me == SERVER:
                inbox = {r: self.wire_like(members[r], round_) for r in part if r != SERVER}
                works = [
                    comm.recv(t, src=r, tag=k, async_op=True)
                    for r in sorted(inbox)
                    for k, t in enumerate(inbox[r])
                ]
                for w in works:
                    w.wait()
                if mine:
                    inbox[SERVER] = wire
                rows = {r: self.decode(t, members[r], round_) for r, t in inbox.items()}
                self.server_step(self._aggregate(rows, members), rows)
                down = self.downlink()
                works = [
                    comm.send(t, dst=r, tag=16 + k, async_op=True)
                    for r in range(comm.size)
                    if r != SERVER
                    for k, t in enumerate(down)
                ]
                for w in works:
                    w.wait()
            else:
                works = [comm.send(t, dst=SERVER, tag=k, async_op=True) for k, t in enumerate(wire)]
                for w in works:
                    w.wait()
                down = [torch.empty_like(t) for t in self.downlink()]
                works = [
                    comm.recv(t, src=SERVER, tag=16 + k, async_op=True) for k, t in enumerate(down)
                ]
                for w in works:
                    w.wait()
                self.uplink_bytes += sum(t.numel() * t.element_size() for t in wire)
                self.downlink_bytes += sum(t.numel() * t.element_size() for t in down)
        except Exception as e:  # noqa: BLE001 - a static group re-raises; elastic: round fails
            failed = True
            self.sync.report(e)
        self.grad_sum.zero_()
        self.grad_steps = 0
        if not self.sync.commit() or failed:
            if saved is not None:
                self._server_restore(saved)  # the server's step is undone too
            write_flat(self.params, self.x)  # drop the round's local steps, as torchft does
            self.sync.discarded("federated round", self.local_step, "not committed")
            return
        if me != SERVER:
            self.take_downlink(down)
        self.finish(mine, y)
        if not self.keeps_local:
            write_flat(self.params, self.x)
        self.rounds += 1
        self.last_participants = chosen
        self.sync.committed(None, self.local_step)  # replicas may differ (noise): no parity

    def _server_snapshot(self) -> list[torch.Tensor | None]:
        """What the server's step changes (x, c, ADMM-NR's table), to undo a failed round."""
        table = getattr(self, "table", None)
        return [t.clone() for t in self.downlink()] + [None if table is None else table.clone()]

    def _server_restore(self, saved: list[torch.Tensor | None]) -> None:
        for t, s in zip(self.downlink(), saved):
            t.copy_(s)
        if hasattr(self, "table"):
            self.table = saved[-1]

    # -- metrics and state ----------------------------------------------------------------------
    def shared_state(self) -> list[torch.Tensor]:
        """x, the server's model, which every worker holds after a round's downlink: bit-identical
        without link noise (tests/test_matrix.py compares it). The elastic parity check is not
        run on it (`committed(None, ...)`): with --link ...:noise=SIGMA replicas differ by design."""
        return [self.x]

    def metrics(self) -> dict[str, Any]:
        return {
            **super().metrics(),
            "round": self.rounds,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "round_clients": len(self.last_participants),
        }

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The rule's own tensors (control variates, ...), saved and loaded by name."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "x": self.x.clone(),
            "rounds": self.rounds,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "grad_sum": self.grad_sum.clone(),
            "grad_steps": self.grad_steps,
            "extra": {k: v.clone() for k, v in self.extra_state().items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.x.copy_(state["x"])
        self.rounds = int(state["rounds"])
        self.uplink_bytes = int(state["uplink_bytes"])
        self.downlink_bytes = int(state["downlink_bytes"])
        self.grad_sum.copy_(state["grad_sum"])
        self.grad_steps = int(state["grad_steps"])
        for k, v in self.extra_state().items():
            v.copy_(state["extra"][k])


class FedAvg(Federated):
    """FedAvg (McMahan et al. 2017): x <- x + eta_g mean_{i in S}(y_i - x)."""

    name = "fedavg"


@dataclasses.dataclass(kw_only=True)
class FedProxOptions(FederatedOptions):
    """Options of --algo fedprox."""

    mu: float = 0.01
    """Proximal weight mu: every local gradient gets mu (y - x) added (0: FedAvg)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise OptionError(f"{{mu}} must be at least 0, got {self.mu}")


class FedProx(Federated):
    """FedProx (Li et al. 2020): FedAvg on the local objective f_i(y) + (mu/2)||y - x||^2."""

    name = "fedprox"
    Options = FedProxOptions

    def correction(self, y: torch.Tensor) -> torch.Tensor | None:
        return self.options.mu * (y - self.x) if self.options.mu else None


def fedavg_server_step(x: torch.Tensor, mean_dy: torch.Tensor, server_lr: float) -> torch.Tensor:
    """FedAvg's (and FedProx's) server step, pure: x + eta_g mean_{i in S}(y_i - x).
    The class and the Flower strategy (lowband.flower) both call it."""
    return torch.add(x, mean_dy, alpha=server_lr)


def fedavg_reference(
    x: torch.Tensor, grads: list, k: int, lr: float, server_lr: float = 1.0, mu: float = 0.0
) -> torch.Tensor:
    """One FedAvg/FedProx round in fp64 with SGD local steps, full participation (test reference).
    grads[i](y) is client i's gradient."""
    deltas = []
    for g in grads:
        y = x.clone()
        for _ in range(k):
            y = y - lr * (g(y) + mu * (y - x))
        deltas.append(y - x)
    return x + server_lr * torch.stack(deltas).mean(0)


__all__ = [
    "FedAvg",
    "FedProx",
    "Federated",
    "FederatedOptions",
    "fedavg_reference",
    "fedavg_server_step",
    "participants",
]
