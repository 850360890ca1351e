"""ADMM-NR: noise-robust federated ADMM without the dual variable (docs/federated.md).

Consensus ADMM's scaled dual u_i integrates every noisy copy of the global model z a client
receives. Eliminating it (the x-update's optimality gives rho u_i = -grad f_i(x_i) + rho (z_start
- z_end) after a participation), client i in the round's S:

  1. at the round's start, anchor a_i = z_now + z_end - z_start + gbar_i / rho, where z_now is
     its latest copy of z, (z_start, z_end) the copies at the start and end of its last
     participation and gbar_i the last raw local gradient of that participation (~ grad f_i at
     its new model; the round's mean gradient lags it and makes inexact solves diverge);
     then z_start <- z_now;
  2. K local steps on f_i(x) + (rho/2)||x - a_i||^2 (the hook adds rho (x - a_i)), from x_i;
  3. uplink s_i = x_i + z_start - a_i (= x_i + u_i);
  4. server: table[i] <- s_i; z <- z + eta_g (mean_j table[j] - z) (the last s_j of every client);
     downlink z; the participant sets z_end <- z, gbar_i <- this round's.
A client outside S keeps its local model and keeps stepping towards its last anchor (the paper's
second modification).

What the loop sees: between rounds the model holds the client's copy of z (so evaluation and
checkpoints show the global model, as for every other rule) and the local model x_i waits in
`local`; the sampler wrapper puts x_i back before the next local step's batch is drawn. Noiseless, it is standard ADMM (to rounding; `admm_reference`); under
noise, no quantity sums the noise over rounds. Reference functions for weighted least squares
with exact local solves are `admm_wls` and `admm_nr_wls` (the test references).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lowband.algorithms.base import write_flat
from lowband.algorithms.federated import SERVER, Federated, FederatedOptions, participants
from lowband.algorithms.registry import OptionError


@dataclasses.dataclass(kw_only=True)
class AdmmNrOptions(FederatedOptions):
    """Options of --algo admm-nr."""

    rho: float = 10.0
    """ADMM penalty rho: every local gradient gets rho (x - a_i) added."""
    grad_estimate: str = "last"
    """grad f_i at the new local model, for the anchor: last (the round's last local gradient: exact solves, deterministic gradients) or mean (the round's mean: less noise from minibatches)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho > 0:
            raise OptionError(f"{{rho}} must be positive, got {self.rho}")
        if self.grad_estimate not in ("last", "mean"):
            raise OptionError(
                "{grad_estimate=} must be last or mean", grad_estimate=self.grad_estimate
            )


class AdmmNR(Federated):
    """Noise-robust, resource-efficient ADMM (Lari et al. 2024), dual-free (module docstring)."""

    name = "admm-nr"
    Options = AdmmNrOptions
    supports = frozenset()  # the server's table holds stale rows: no robust rule over them
    keeps_local = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchor = self.x.clone()
        self.z_start = self.x.clone()
        self.z_end = self.x.clone()
        self.g_last = torch.zeros_like(self.x)
        self.table: torch.Tensor | None = None
        """The server's last payload of every client (rank 0 only), N x d."""
        self.local = self.x.clone()
        """This client's local model x_i while the model shows z (between rounds)."""
        self.showing_global = False
        self._new_anchor(1)

    def _in(self, round_: int) -> bool:
        members = self.sync.members
        chosen = participants(members, self.options.clients(self.comm.size), self.seed, round_)
        return members[self.comm.rank] in chosen

    @torch.no_grad()
    def _new_anchor(self, round_: int) -> None:
        """Step 1 for round `round_`, if this client takes part in it."""
        if self._in(round_):
            z_now = self.x
            self.anchor = admm_nr_anchor(
                z_now, self.z_end, self.z_start, self.g_last, self.options.rho
            )
            self.z_start = z_now.clone()

    def correction(self, y):
        return self.options.rho * (y - self.anchor)

    def client_vectors(self, y, round_):
        return [y + self.z_start - self.anchor]

    def server_step(self, agg, rows):
        n = self.comm.size
        if self.table is None or self.table.shape[0] != n:
            self.table = self.x.expand(n, -1).clone()  # s_j^0 = x_j^0 + u_j^0 = x^0
        z, self.table = admm_nr_server_step(
            self.x, self.table, {r: v[0] for r, v in rows.items()}, self.options.server_lr
        )
        self.x.copy_(z)

    def finish(self, participant, y):
        if participant:
            self.z_end = self.x.clone()
            self.g_last = self.gbar_round.clone()
        self._new_anchor(self.local_step // self.K + 1)
        self.local = y.clone()
        write_flat(self.params, self.x)  # show z until the next local step (module docstring)
        self.showing_global = True

    @torch.no_grad()
    def resume_local(self) -> None:
        """Put the local model x_i back into the model (before a local step's forward)."""
        if self.showing_global:
            write_flat(self.params, self.local)
            self.showing_global = False

    def wrap_sampler(self, sampler: Any) -> Any:
        return _ResumeLocal(super().wrap_sampler(sampler), self)

    @torch.no_grad()
    def _continue_round(self, round_: int) -> None:
        # ~ grad f_i at the round's last local model (module docstring, step 1)
        last = self.options.grad_estimate == "last"
        self.gbar_round = self.grad_last if last else self.gbar()
        super()._continue_round(round_)

    def extra_state(self):
        return {
            "local": self.local,
            "anchor": self.anchor,
            "z_start": self.z_start,
            "z_end": self.z_end,
            "g_last": self.g_last,
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["table"] = None if self.table is None else self.table.clone()
        state["showing_global"] = self.showing_global
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        table = state.get("table")
        self.table = None if table is None or self.comm.rank != SERVER else table.clone()
        self.showing_global = bool(state.get("showing_global", False))


def admm_nr_anchor(z_now, z_end, z_start, g, rho):
    """Step 1's anchor a_i = z_now + z_end - z_start + g_i / rho (module docstring)."""
    return z_now + z_end - z_start + g / rho


def admm_nr_server_step(z, table, rows, server_lr=1.0):
    """Step 4, pure: table[i] <- s_i for the rows {i: s_i} received; z + eta_g (mean table - z).
    Returns new (z, table); the table keeps every other client's last payload."""
    table = table.clone()
    for i, s in rows.items():
        table[i] = s
    return torch.add(z, table.mean(0) - z, alpha=server_lr), table


class _ResumeLocal:
    """The loop's sampler, putting the client's local model back before each batch is drawn."""

    def __init__(self, sampler: Any, algo: AdmmNR) -> None:
        self.sampler, self.algo = sampler, algo

    def batch(self, step: int) -> Any:
        self.algo.resume_local()
        return self.sampler.batch(step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


# -- fp64 references on weighted least squares: f_i(x) = 1/2 ||W_i^(1/2) (A_i x - b_i)||^2 --------


def _solve(H: torch.Tensor, g: torch.Tensor, rho: float, anchor: torch.Tensor) -> torch.Tensor:
    """argmin_x 1/2 x^T H x - g^T x + rho/2 ||x - anchor||^2."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.solve(H + rho * eye, g + rho * anchor)


def admm_wls(H, g, rho, rounds, clients, noise, gen):
    """Standard consensus ADMM (scaled dual) with exact local solves; `clients(r)` the round's S;
    every received z gets N(0, noise^2) (two receptions per participation). Returns the z's."""
    n, d = len(H), H[0].shape[0]
    x = [torch.zeros(d, dtype=H[0].dtype) for _ in range(n)]
    u = [torch.zeros_like(x[0]) for _ in range(n)]
    s = [x[i] + u[i] for i in range(n)]
    z, out = torch.zeros_like(x[0]), []
    for r in range(rounds):
        S = clients(r)
        for i in S:
            zi = z + noise * torch.randn(d, generator=gen, dtype=z.dtype)
            x[i] = _solve(H[i], g[i], rho, zi - u[i])
            s[i] = x[i] + u[i]
        z = torch.stack(s).mean(0)
        for i in S:
            zi = z + noise * torch.randn(d, generator=gen, dtype=z.dtype)
            u[i] = u[i] + x[i] - zi
        out.append(z)
    return out


def admm_nr_wls(H, g, rho, rounds, clients, noise, gen):
    """ADMM-NR (module docstring) with exact local solves; one noisy copy of z per client per round
    (every client receives it); unscheduled clients keep their model. Returns the z's."""
    n, d = len(H), H[0].shape[0]
    zero = torch.zeros(d, dtype=H[0].dtype)
    x = [zero.clone() for _ in range(n)]
    z_now = [zero.clone() for _ in range(n)]
    z_start = [zero.clone() for _ in range(n)]
    z_end = [zero.clone() for _ in range(n)]
    grad = [zero.clone() for _ in range(n)]
    s = [zero.clone() for _ in range(n)]
    z, out = zero.clone(), []
    for r in range(rounds):
        S = clients(r)
        for i in S:
            a = z_now[i] + z_end[i] - z_start[i] + grad[i] / rho
            z_start[i] = z_now[i]
            x[i] = _solve(H[i], g[i], rho, a)
            s[i] = x[i] + z_start[i] - a
        z = torch.stack(s).mean(0)
        for i in range(n):
            z_now[i] = z + noise * torch.randn(d, generator=gen, dtype=z.dtype)
        for i in S:
            z_end[i] = z_now[i]
            grad[i] = H[i] @ x[i] - g[i]
        out.append(z)
    return out


__all__ = [
    "AdmmNR",
    "AdmmNrOptions",
    "admm_nr_anchor",
    "admm_nr_server_step",
    "admm_nr_wls",
    "admm_wls",
]
