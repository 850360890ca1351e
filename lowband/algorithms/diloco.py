"""DiLoCo and Streaming DiLoCo: H local steps, then an outer Nesterov step on averaged pseudo-gradients.

DiLoCo (Douillard et al. 2023), for every worker i, with theta_g the global parameters:
  1. H inner steps of the user's optimizer (AdamW typically) move theta_i away from theta_g.
  2. Pseudo-gradient Delta = mean_i(theta_g - theta_i), averaged across workers.
  3. Outer step, SGD with Nesterov momentum (lr 0.7, momentum 0.9):
         b <- mu*b + Delta ;  theta_g <- theta_g - eta*(Delta + mu*b)
     (exactly torch.optim.SGD(nesterov=True) with Delta as the gradient).
  4. Every worker continues from theta_i <- theta_g.

Streaming DiLoCo (Douillard et al. 2025) changes three things:
  * the parameters are split into P fragments strided over the layers (fragment p holds layers
    p, p+P, p+2P, ...; the embeddings go with fragment 0, the final norm and head with P-1), and
    fragment p is synchronised at local steps t with t % H == ((p+1) * H/P) % H: one fragment
    every H/P steps, each exactly once per H steps, so the peak bytes per sync are ~1/P;
  * overlap: fragment p's pseudo-gradient is taken TAU steps before its sync point and reduced in
    a background thread while the inner steps go on (tau in the paper); at the sync point the
    result is waited for (only what is left of it is exposed) and, after the outer step,
        theta_p <- (1 - alpha) * theta_g,p(new) + alpha * theta_p(local, TAU steps newer)
    (alpha = 0 drops the TAU local steps, 0.5 keeps half). With TAU = 0 there are no newer local
    steps and the rule is the plain replacement theta_p <- theta_g,p of step 4;
  * the pseudo-gradients travel quantized (lowband.comm.codecs, 4-bit in the paper) through
    `quantized_all_reduce`: an all-to-all of codec bytes, an fp32 sum, an all-gather of codec
    bytes. Every rank decodes the same bytes, so theta_g stays bit-identical on every worker.

With a `reducer` (--aggregate other than mean, or --attack; lowband.robust.RobustReducer) the
pseudo-gradient of a fragment is all-gathered and aggregated by a Byzantine-robust rule instead of
averaged, in the background thread as well when TAU > 0; without one nothing above changes.

DiLoCo is Streaming DiLoCo with P = 1 and TAU = 0. With H = 1, outer lr 1, no momentum and a
plain-SGD inner optimizer, it is synchronous data parallel on parameters (tests/test_diloco.py).

Ordering argument (why the background thread cannot deadlock): syncs of different fragments are
H/P steps apart and TAU < H/P, so at most one reduction is in flight, and the loop issues no other
collective while it is (checkpoints and the end of training wait for it first). Every rank
therefore issues the same collectives in the same order on the one process group.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start
from lowband.algorithms.overlap import BackgroundReducer
from lowband.comm import Comm, get_codec, quantized_all_reduce
from lowband.comm.quantized import quantized_all_reduce_bytes
from lowband.errors import ConfigError
from lowband.robust import RobustReducer


def strided_fragments(model: nn.Module, num_fragments: int) -> list[list[nn.Parameter]]:
    """Split the trainable parameters into P fragments strided over the model's layers.

    A model with a `layers` ModuleList (lowband's Transformer, most decoders) gets layer l in
    fragment l % P; parameters before the layers (embeddings) join fragment 0 and those after
    (final norm, output head) fragment P-1. Any other module is split parameter by parameter,
    in order, parameter k going to fragment k % P.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if num_fragments < 1:
        raise ConfigError(f"--fragments must be at least 1, got {num_fragments}")
    if num_fragments == 1:
        return [params]
    frags: list[list[nn.Parameter]] = [[] for _ in range(num_fragments)]
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) >= num_fragments:
        in_layer = {}
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                in_layer[id(p)] = i
        seen_layer = False
        for p in params:
            if id(p) in in_layer:
                seen_layer = True
                frags[in_layer[id(p)] % num_fragments].append(p)
            else:
                frags[-1 if seen_layer else 0].append(p)
    else:
        if len(params) < num_fragments:
            raise ConfigError(
                f"--fragments {num_fragments} is more than the model's {len(params)} parameter tensors"
            )
        for k, p in enumerate(params):
            frags[k % num_fragments].append(p)
    return frags


@torch.no_grad()
def outer_step_reference(
    theta_g: torch.Tensor,
    momentum: torch.Tensor,
    delta: torch.Tensor,
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> None:
    """The textbook outer update, in place on flat tensors (the test reference)."""
    momentum.mul_(mu).add_(delta)
    theta_g.sub_(lr * (delta + mu * momentum) if nesterov else lr * momentum)


class StreamingDiLoCo(Algorithm):
    """Streaming DiLoCo; `DiLoCo` is the P = 1, TAU = 0 special case. See the module docstring."""

    name = "streaming-diloco"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        comm: Comm,
        *,
        sync_every: int = 100,
        fragments: int = 4,
        overlap: int = 1,
        mix: float = 0.5,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        bits: int | str = 32,
        block_size: int = 64,
        broadcast_init: bool = True,
        reducer: RobustReducer | None = None,
    ) -> None:
        super().__init__(model, optimizer, comm)
        if sync_every < 1:
            raise ConfigError(f"--sync-every must be at least 1, got {sync_every}")
        if sync_every % fragments:
            raise ConfigError(
                f"--sync-every {sync_every} must be a multiple of --fragments {fragments}"
            )
        if overlap < 0 or (overlap > 0 and overlap >= sync_every // fragments):
            raise ConfigError(
                f"--overlap {overlap} must be below --sync-every/--fragments = {sync_every // fragments} "
                "(one fragment's reduction must land before the next one starts)"
            )
        if not 0.0 <= mix <= 1.0:
            raise ConfigError(f"--mix must be in [0, 1], got {mix}")
        self.H, self.P, self.tau, self.alpha = sync_every, fragments, overlap, mix
        self.codec = get_codec(bits, block_size)
        self.fragments = strided_fragments(model, fragments)
        # --aggregate/--attack: pseudo-gradients are all-gathered and aggregated robustly instead
        # of averaged by the quantized all-reduce (lowband.robust; one aggregator per fragment).
        self.reducer = reducer

        if broadcast_init:  # every worker starts from rank 0's parameters
            ensure_same_start(comm, [[p.data for p in frag] for frag in self.fragments])
        # theta_g in fp32, one copy per parameter; the outer optimizer steps it.
        self.global_params = [[p.detach().clone().float() for p in frag] for frag in self.fragments]
        self.outer_opt = torch.optim.SGD(
            [g for frag in self.global_params for g in frag],
            lr=outer_lr,
            momentum=outer_momentum,
            nesterov=nesterov and outer_momentum > 0,  # torch refuses Nesterov without momentum
        )
        self.outer_steps = 0  # fragment syncs completed
        self.sync_history: list[tuple[int, int]] = []  # (local step, fragment) of every sync
        self.peak_sync_bytes = 0
        self._reducer = BackgroundReducer(comm, self.codec)
        self._pending: tuple[int, int, Any] | None = None  # (fragment, due step, future or result)

    # -- schedule -------------------------------------------------------------------------------
    def sync_step_of(self, fragment: int) -> int:
        """Local steps t with t % H == this value (and t > 0) synchronise `fragment`."""
        return ((fragment + 1) * self.H // self.P) % self.H

    def _fragment_due_at(self, t: int) -> int | None:
        for p in range(self.P):
            if t % self.H == self.sync_step_of(p):
                return p
        return None

    # -- the hook after every inner step --------------------------------------------------------
    def step(self) -> None:
        super().step()
        t = self.local_step
        starting = self._fragment_due_at(t + self.tau)
        if self.tau > 0 and starting is not None:
            self._start(starting, due=t + self.tau)
        due = self._fragment_due_at(t)
        if due is not None:
            if self.tau == 0:
                self._start(due, due=t)
            self._finish(due, t)

    def _pseudo_gradient(self, fragment: int) -> torch.Tensor:
        """theta_g - theta_local of one fragment, flat, in fp32."""
        return torch.cat(
            [
                (g - p.detach().float()).reshape(-1)
                for g, p in zip(self.global_params[fragment], self.fragments[fragment])
            ]
        )

    @torch.no_grad()
    def _start(self, fragment: int, due: int) -> None:
        assert self._pending is None, "two fragment reductions in flight"
        delta = self._pseudo_gradient(fragment)
        if self.reducer is not None:
            sent = self.reducer.bytes_per_round(delta.numel())
            self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
            reduce = functools.partial(self.reducer, round_=due, key=fragment)
            work = reduce(delta) if self.tau == 0 else self._reducer.submit(delta, reduce)
            self._pending = (fragment, due, work)
            return
        sent = quantized_all_reduce_bytes(delta.numel(), self.comm.size, self.codec)
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        if self.tau == 0:
            self._pending = (
                fragment,
                due,
                quantized_all_reduce(self.comm, delta, self.codec, op="avg"),
            )
            return
        self._pending = (fragment, due, self._reducer.submit(delta))

    def _result(self) -> torch.Tensor:
        fragment, due, work = self._pending
        work = self._reducer.result(work)  # only this wait is exposed
        self._pending = (fragment, due, work)
        return work

    @torch.no_grad()
    def _finish(self, fragment: int, t: int) -> None:
        pending_fragment, due, _ = self._pending
        assert (pending_fragment, due) == (fragment, t), (pending_fragment, due, fragment, t)
        delta = self._result()
        self._pending = None
        globals_ = self.global_params[fragment]
        offset = 0
        for g in self.outer_opt.param_groups[0]["params"]:
            g.grad = None
        for g in globals_:
            g.grad = delta[offset : offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        self.outer_opt.step()  # only this fragment has gradients, so only it moves
        for g, p in zip(globals_, self.fragments[fragment]):
            g.grad = None
            if self.tau > 0 and self.alpha > 0:
                p.copy_(((1 - self.alpha) * g + self.alpha * p.float()).to(p.dtype))
            else:
                p.copy_(g.to(p.dtype))
        self.outer_steps += 1
        self.sync_history.append((t, fragment))

    # -- life cycle, metrics, state -------------------------------------------------------------
    def close(self) -> None:
        if self._pending is not None:
            self._result()  # let the in-flight reduction land; its result stays pending
        self._reducer.close()

    def metrics(self) -> dict[str, Any]:
        return {"outer_step": self.outer_steps, "peak_sync_bytes": self.peak_sync_bytes}

    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:  # a checkpoint mid-flight keeps the (deterministic) result
            fragment, due, _ = self._pending
            pending = {"fragment": fragment, "due": due, "delta": self._result().clone()}
        return {
            **super().state_dict(),
            "global_params": [[g.clone() for g in frag] for frag in self.global_params],
            "outer_opt": self.outer_opt.state_dict(),
            "outer_steps": self.outer_steps,
            "peak_sync_bytes": self.peak_sync_bytes,
            "pending": pending,
            **({"robust": self.reducer.state_dict()} if self.reducer is not None else {}),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for frag, saved in zip(self.global_params, state["global_params"]):
            for g, s in zip(frag, saved):
                g.copy_(s)
        self.outer_opt.load_state_dict(state["outer_opt"])
        self.outer_steps = int(state["outer_steps"])
        self.peak_sync_bytes = int(state["peak_sync_bytes"])
        if self.reducer is not None:
            self.reducer.load_state_dict(state.get("robust", {}))
        p = state["pending"]
        device = self.global_params[0][0].device
        self._pending = None if p is None else (p["fragment"], p["due"], p["delta"].to(device))


class DiLoCo(StreamingDiLoCo):
    """DiLoCo: the whole model synchronised every H steps, no overlap."""

    name = "diloco"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        comm: Comm,
        *,
        sync_every: int = 100,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        bits: int | str = 32,
        block_size: int = 64,
        broadcast_init: bool = True,
        reducer: RobustReducer | None = None,
    ) -> None:
        super().__init__(
            model,
            optimizer,
            comm,
            sync_every=sync_every,
            fragments=1,
            overlap=0,
            mix=0.0,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            nesterov=nesterov,
            bits=bits,
            block_size=block_size,
            broadcast_init=broadcast_init,
            reducer=reducer,
        )
