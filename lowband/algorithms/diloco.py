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
    p, p+P, p+2P, ...; the embeddings go with fragment 0, the final norm and head with P-1; a model
    without layers to stride over is cut into P contiguous runs balanced by bytes), and
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

import dataclasses
import functools
from typing import Any, ClassVar

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start
from lowband.algorithms.fragments import (  # noqa: F401 - also importable from here, as before
    BLOCK_CONTAINERS,
    STRIDED_SLACK,
    balanced_cuts,
    fragment_balance,
    module_fragments,
    strided_fragments,
)
from lowband.algorithms.overlap import BackgroundReducer
from lowband.algorithms.registry import OptionError, check_bits
from lowband.algorithms.robust import gathers_updates
from lowband.comm import Comm, get_codec, quantized_all_reduce
from lowband.comm.quantized import quantized_all_reduce_bytes
from lowband.comm.sparse import TiledTopK, TopK
from lowband.comm.sync import SyncGroup
from lowband.errors import ConfigError
from lowband.robust import RobustReducer


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


@dataclasses.dataclass(kw_only=True)
class DiLoCoOptions:
    """Options of --algo diloco."""

    sync_every: int = 60
    """Inner steps between outer steps (H)."""
    outer_lr: float = 0.7
    """Learning rate of the outer Nesterov SGD step."""
    outer_momentum: float = 0.9
    """Momentum of the outer Nesterov SGD step (0: plain SGD)."""
    bits: int = 32
    """Bits per pseudo-gradient value on the wire: 32, 16 (bf16), 8 or 4 (blockwise int)."""
    compress: str | None = None
    """SparseLoCo: topk:FRACTION[:BITS[:flat|tiles]] sends, per chunk of 4096 values (flat: runs of the fragment's flat vector; tiles: 64 x 64 tiles of each matrix and runs of each vector, chunks never crossing a tensor, k = round(FRACTION x 4096) per chunk), the FRACTION largest of the error-feedback buffer at BITS bits (default 2), indices packed (from Python, a lowband.SparseCompressor works too); the outer step is then plain SGD (the decayed buffer replaces outer momentum, so outer_momentum and bits are not used). docs/diloco.md."""
    error_decay: float = 0.95
    """SparseLoCo: decay beta of the error-feedback buffer, e <- beta e + Delta (with compress)."""
    sparse_mean: str = "all"
    """SparseLoCo: all divides the sum of the decoded updates by the group's size; senders divides each coordinate by the number of workers that sent it (the reference code's mean; with compress; docs/diloco.md)."""
    outer: str = "blocking"
    """blocking: every worker waits for the outer reduction at each sync. eager (Kale et al. 2025): the reduction of a round runs during the next H inner steps; meanwhile each worker applies its own fresh pseudo-gradient (1/M of it) at once and everyone's average one round late (docs/diloco.md). With streaming-diloco, overlap and mix are not used."""

    def __post_init__(self) -> None:
        if self.outer not in ("blocking", "eager"):
            raise OptionError(f"{{outer}} must be blocking or eager, got {self.outer!r}")
        if self.compress is not None and not isinstance(self.compress, TopK):
            try:
                TopK.parse(self.compress)
            except ConfigError as e:
                raise OptionError(f"{{compress}}: {e}") from None
        if self.sparse_mean not in ("all", "senders"):
            raise OptionError(f"{{sparse_mean}} must be all or senders, got {self.sparse_mean!r}")
        if self.sparse_mean == "senders" and self.compress is None:
            raise OptionError("{sparse_mean} senders needs {compress} (a top-k spec)")
        if not 0.0 <= self.error_decay <= 1.0:
            raise OptionError(f"{{error_decay}} must be in [0, 1], got {self.error_decay}")
        if self.sync_every < 1:
            raise OptionError(f"{{sync_every}} must be at least 1, got {self.sync_every}")
        if not self.outer_lr > 0:
            raise OptionError(f"{{outer_lr}} must be positive, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise OptionError(f"{{outer_momentum}} must be in [0, 1), got {self.outer_momentum}")
        check_bits(self.bits)


@dataclasses.dataclass(kw_only=True)
class StreamingDiLoCoOptions(DiLoCoOptions):
    """Options of --algo streaming-diloco."""

    fragments: int = 4
    """Fragments P, synchronised one every H/P steps."""
    overlap: int = 1
    """A fragment's reduction starts this many inner steps before it is needed and runs while training goes on (tau)."""
    mix: float = 0.5
    """Weight alpha of the local parameters when an overlapped fragment lands (0 replaces them)."""
    bits: int = 4
    """Bits per pseudo-gradient value on the wire: 32, 16 (bf16), 8 or 4 (blockwise int)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        p, tau, h = self.fragments, self.overlap, self.sync_every
        if p < 1 or h % p:
            raise OptionError(
                "{sync_every=} must be a multiple of {fragments=}", sync_every=h, fragments=p
            )
        if tau < 0 or (tau > 0 and tau >= h // p):
            raise OptionError(
                f"{{overlap=}} must be below {{sync_every}}/{{fragments}} = {h // p} "
                "(one fragment's reduction must land before the next one starts)",
                overlap=tau,
            )
        if not 0.0 <= self.mix <= 1.0:
            raise OptionError(f"{{mix}} must be in [0, 1], got {self.mix}")


class StreamingDiLoCo(Algorithm):
    """Streaming DiLoCo; `DiLoCo` is the P = 1, TAU = 0 special case. See the module docstring."""

    name = "streaming-diloco"
    Options: ClassVar[type] = StreamingDiLoCoOptions
    supports = frozenset({"robust"})

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group: Comm | SyncGroup,
        *,
        nesterov: bool = True,
        block_size: int = 64,
        reducer: RobustReducer | None = None,
        fragment_modules: list[list[nn.Module]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, optimizer, group)
        if fragment_modules is not None and "fragments" in {
            f.name for f in dataclasses.fields(self.Options)
        }:
            options.setdefault("fragments", len(fragment_modules))
        self.options = opts = self.Options(**options)
        self.H, self.P = opts.sync_every, getattr(opts, "fragments", 1)
        self.tau, self.alpha = getattr(opts, "overlap", 0), getattr(opts, "mix", 0.0)
        self.eager = opts.outer == "eager"
        if self.eager:  # a fragment's reduction spans the H steps to its next sync instead
            self.tau, self.alpha = 0, 0.0
        self.codec = get_codec(opts.bits, block_size)
        self.compressor = (
            opts.compress
            if isinstance(opts.compress, TopK) or opts.compress is None
            else TopK.parse(opts.compress)
        )
        if self.compressor is not None and opts.sparse_mean != "all":
            self.compressor = dataclasses.replace(self.compressor, mean=opts.sparse_mean)
        """SparseLoCo's top-k + error feedback (lowband.comm.sparse), or None."""
        if fragment_modules is None:
            self.fragments = strided_fragments(model, self.P)
        elif len(fragment_modules) != self.P:
            raise ConfigError(
                f"fragment_modules has {len(fragment_modules)} groups for {self.P} fragments"
            )
        else:
            self.fragments = module_fragments(model, fragment_modules)
        self.fragment_shares = fragment_balance(self.fragments)
        """Each fragment's share of the parameter bytes: the peak sync is ~max of it."""
        # --aggregate/--attack: pseudo-gradients are all-gathered and aggregated robustly instead
        # of averaged by the quantized all-reduce (lowband.robust; one aggregator per fragment).
        self.reducer = reducer

        # every worker starts from rank 0's parameters
        ensure_same_start(self.comm, [[p.data for p in frag] for frag in self.fragments])
        # theta_g in fp32, one copy per parameter; the outer optimizer steps it.
        self.global_params = [[p.detach().clone().float() for p in frag] for frag in self.fragments]
        # SparseLoCo: the decayed error-feedback buffer stands in for outer momentum.
        momentum = 0.0 if self.compressor is not None else opts.outer_momentum
        self.outer_opt = torch.optim.SGD(
            [g for frag in self.global_params for g in frag],
            lr=opts.outer_lr,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,  # torch refuses Nesterov without it
        )
        self.error = (
            [torch.zeros(sum(g.numel() for g in frag), device=frag[0].device)
             for frag in self.global_params]
            if self.compressor is not None else []
        )  # fmt: skip
        """Per fragment: this worker's error-feedback buffer (its own; never shared)."""
        self.fragment_compressors = (
            [self.compressor.bind([g.shape for g in frag]) for frag in self.global_params]
            if self.compressor is not None else []
        )  # fmt: skip
        """Per fragment: the compressor in the spec's chunk layout (per-tensor tiles need the
        fragment's shapes; the flat layout is `compressor` itself)."""
        # --outer eager: this worker's own part of its parameters, theta_i = theta_g + offset (its
        # fresh pseudo-gradients not yet replaced by the average), stepped by its own copy of the
        # outer optimizer; `sent` is its contribution to the reduction in flight.
        self.offset = (
            [[torch.zeros_like(g) for g in frag] for frag in self.global_params]
            if self.eager else []
        )  # fmt: skip
        self.offset_opt = torch.optim.SGD(
            [o for frag in self.offset for o in frag] or [torch.zeros(1)],
            lr=opts.outer_lr,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
        )
        self.sent = [torch.zeros(sum(g.numel() for g in frag), device=frag[0].device)
                     for frag in self.global_params] if self.eager else []  # fmt: skip
        self._fresh: dict[int, torch.Tensor] = {}  # eager: pseudo-gradients taken at a sync
        self._healing = False
        self.outer_steps = 0  # fragment syncs completed
        self.sync_history: list[tuple[int, int]] = []  # (local step, fragment) of every sync
        self.peak_sync_bytes = 0
        self._reducer = BackgroundReducer(self.comm, self.codec)
        self._pending: dict[int, tuple[int, Any]] = {}  # fragment -> (due step, future/result)

    @classmethod
    def check_run(cls, cfg: Any, options: Any) -> None:
        """Before any worker starts: combinations of run-level flags with these options."""
        if options.sparse_mean == "senders" and (cfg.elastic or gathers_updates(cfg)):
            raise ConfigError(
                "--sparse-mean senders is the plain gather's mean: it does not combine with "
                "--elastic (a healing member's empty update would count as sent) or a robust "
                "--aggregate or --attack (the rule runs over whole rows); use --sparse-mean all"
            )
        if options.outer == "eager" and cfg.elastic:
            raise ConfigError(
                "--outer eager keeps a round's reduction in flight across the next round's "
                "quorum, which the elastic sync group does not support yet; use --outer blocking "
                "with --elastic"
            )

    @classmethod
    def from_options(cls, model, optimizer, group, options, setup) -> StreamingDiLoCo:
        reducer = setup.reducer(get_codec(options.bits))
        return cls(model, optimizer, group, reducer=reducer, **dataclasses.asdict(options))

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
        if self.joining:
            self.join()
            return
        super().step()
        t = self.local_step
        if self.eager:
            fragment = self._fragment_due_at(t)
            if fragment is not None:
                self._eager_sync(fragment, t)
            return
        fragment = self._fragment_due_at(t + self.tau)
        if fragment is not None:
            self._sync_round((fragment, t + self.tau))
        self._land_due()

    def _land_due(self) -> None:
        for fragment in [f for f, (due, _) in self._pending.items() if due == self.local_step]:
            self._finish(fragment)

    @torch.no_grad()
    def _eager_sync(self, fragment: int, t: int) -> None:
        """--outer eager at a fragment's sync: take the fresh pseudo-gradient, land the average of
        the round before (on the shared parameters), then start this round's reduction, due at
        the fragment's next sync, and step this worker's own offset (_continue_round)."""
        self._fresh[fragment] = self._pseudo_gradient(fragment)
        if fragment in self._pending:
            self._finish(fragment)
        self._sync_round((fragment, t + self.H))

    def join(self) -> None:
        """A newcomer: heal to its source's step, start the fragment its source starts, and land
        it at once if it is due now (TAU = 0). Its error feedback starts empty: it has sent
        nothing (its source's buffer, which came with the state, is the source's own)."""
        self._healing = True
        try:
            super().join()
        finally:
            self._healing = False
        if not self.eager:
            self._land_due()

    def _pseudo_gradient(self, fragment: int) -> torch.Tensor:
        """theta_start - theta_local of one fragment, flat, in fp32 (theta_start is theta_g, plus
        this worker's offset with --outer eager)."""
        starts = self.global_params[fragment]
        if self.eager:
            starts = [g + o for g, o in zip(starts, self.offset[fragment])]
        return torch.cat(
            [(s - p.detach().float()).reshape(-1) for s, p in zip(starts, self.fragments[fragment])]
        )

    @torch.no_grad()
    def _continue_round(self, round_: tuple[int, int]) -> None:
        """Start a fragment's reduction (in the background when TAU > 0)."""
        fragment, due = round_
        assert fragment not in self._pending, "a fragment's reduction is already in flight"
        comm, scale = self.comm, self.sync.scale
        if self.eager:  # a newcomer (healed in begin()) has trained nothing: it sends zeros
            fresh = self._fresh.pop(fragment, None)
            delta = fresh if fresh is not None else torch.zeros_like(self.sent[fragment])
        else:
            delta = self._pseudo_gradient(fragment)
        own = delta  # this worker's contribution to the average (eager's local proxy)
        robust = (  # a robust rule: rows of non-contributors are left out
            functools.partial(
                self.reducer,
                round_=due,
                key=fragment,
                members=self.sync.members,
                keep=self.sync.contributing,
            )  # called with comm= (the background reducer's, when TAU > 0)
            if self.reducer is not None
            else None
        )
        if self.compressor is not None:  # SparseLoCo: error feedback, top-k, all-gather
            if scale == 0.0:  # a member healing this round contributes nothing (elastic)
                delta = torch.zeros_like(delta)
            compressor = self.fragment_compressors[fragment]
            payload = compressor.compress_(self.error[fragment], delta, self.options.error_decay)
            if robust is not None:  # the rule over every worker's decoded row: a gather
                codec = compressor.as_codec()
                sent = self.reducer.bytes_per_round(delta.numel(), comm.size, codec)
                reduce = functools.partial(robust, codec=codec, numel=delta.numel())
            else:
                sent = compressor.exchange_bytes(delta.numel(), comm.size)
                # the mean over the members that contributed: the same factor on every member
                contributors = max(1, sum(self.sync.contributing))
                reduce = functools.partial(
                    self._sparse_average,
                    compressor=compressor,
                    numel=delta.numel(),
                    scale=comm.size / contributors,
                )
            if self.eager:
                own = compressor.dense(*compressor.unpack(payload, delta.numel()), delta.numel())
            delta = payload  # what travels
        elif robust is not None:
            sent = self.reducer.bytes_per_round(delta.numel(), comm.size)
            reduce = robust
        else:
            sent = quantized_all_reduce_bytes(delta.numel(), comm.size, self.codec)
            reduce = None
            if scale != 1.0:
                delta.mul_(scale)
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        if self.eager:
            self._offset_step(fragment, own, scale / comm.size)
        work: Any
        try:
            if self.tau > 0 or self.eager:
                work = self._reducer.submit(delta, reduce, comm)
            elif reduce is not None:
                work = reduce(delta, comm=comm)
            else:
                work = quantized_all_reduce(comm, delta, self.codec, op="avg")
        except Exception as e:  # noqa: BLE001 - a static group re-raises; elastic: round fails
            self.sync.report(e)
            work = e
        self._pending[fragment] = (due, work)

    @torch.no_grad()
    def _offset_step(self, fragment: int, own: torch.Tensor, weight: float) -> None:
        """--outer eager, this worker's part: its outer optimizer steps the offset with
        weight * (own - what it sent the round before), the fresh local proxy in place of the stale
        one that the landed average now holds; then theta_i <- theta_g + offset."""
        d = (own - self.sent[fragment]).mul_(weight)
        self.sent[fragment].copy_(own)
        _step_flat(self.offset_opt, self.offset[fragment], d)
        for g, o, p in zip(
            self.global_params[fragment], self.offset[fragment], self.fragments[fragment]
        ):
            p.copy_((g + o).to(p.dtype))

    def _sparse_average(
        self,
        payload: torch.Tensor,
        *,
        compressor: TopK | TiledTopK,
        numel: int,
        scale: float,
        comm: Comm,
    ):
        """The mean of every worker's decoded sparse update, x `scale` = members / contributors
        (an elastic round whose healing members sent zeros; 1 otherwise), on every member alike."""
        avg = compressor.average(payload, numel, comm)
        return avg.mul_(scale) if scale != 1.0 else avg

    def _result(self, fragment: int) -> torch.Tensor:
        """A pending reduction's result (only this wait is exposed); raises if it failed."""
        due, work = self._pending[fragment]
        if isinstance(work, BaseException):
            raise work
        work = self._reducer.result(work)
        self._pending[fragment] = (due, work)
        return work

    @torch.no_grad()
    def _finish(self, fragment: int) -> None:
        """Land a pending fragment: commit and take the outer step, or roll the fragment back
        (eager: the shared step is skipped; the worker's offset is stepped by _continue_round)."""
        t, _ = self._pending[fragment]
        delta: torch.Tensor | None = None
        try:
            delta = self._result(fragment)
        except Exception as e:  # noqa: BLE001 - a peer died or hung mid-reduction
            self.sync.report(e)
        del self._pending[fragment]
        if not self.sync.commit() or delta is None:
            if not self.eager:
                for g, p in zip(self.global_params[fragment], self.fragments[fragment]):
                    p.copy_(g.to(p.dtype))  # drop this fragment's local steps, as torchft does
            self.sync.discarded(f"fragment {fragment}", t, "not committed")
            return
        self._outer_step(fragment, delta)
        self.outer_steps += 1
        self.sync_history.append((t, fragment))
        self.sync.committed(self, t)

    @torch.no_grad()
    def _outer_step(self, fragment: int, delta: torch.Tensor) -> None:
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
            if self.eager:
                continue  # theta_i is set from theta_g + offset by the round that follows
            if self.tau > 0 and self.alpha > 0:
                p.copy_(((1 - self.alpha) * g + self.alpha * p.float()).to(p.dtype))
            else:
                p.copy_(g.to(p.dtype))

    # -- life cycle, metrics, state -------------------------------------------------------------
    def close(self) -> None:
        for fragment, (due, work) in sorted(self._pending.items()):
            if isinstance(work, BaseException):
                continue
            try:
                self._result(fragment)  # let the in-flight reduction land; it stays pending
            except Exception as e:  # noqa: BLE001 - static: raised again; elastic: kept failed
                self._pending[fragment] = (due, e)
                self._reducer.close()
                self.sync.report(e)
        self._reducer.close()

    def metrics(self) -> dict[str, Any]:
        return {
            **super().metrics(),
            "outer_step": self.outer_steps,
            "peak_sync_bytes": self.peak_sync_bytes,
        }

    def state_dict(self) -> dict[str, Any]:
        pending = []
        for fragment, (due, _) in sorted(self._pending.items()):
            try:  # a checkpoint mid-flight keeps the (deterministic) result
                delta = self._result(fragment).clone()
            except Exception:  # noqa: BLE001 - a failed round: it will be rolled back at `due`
                delta = None
            pending.append({"fragment": fragment, "due": due, "delta": delta})
        eager = {}
        if self.eager:  # this worker's own: a newcomer healing from it starts with none
            eager = {
                "eager": {
                    "offset": [[o.clone() for o in frag] for frag in self.offset],
                    "offset_opt": self.offset_opt.state_dict(),
                    "sent": [s.clone() for s in self.sent],
                }
            }
        return {
            **super().state_dict(),
            "global_params": [[g.clone() for g in frag] for frag in self.global_params],
            "outer_opt": self.outer_opt.state_dict(),
            "outer_steps": self.outer_steps,
            "peak_sync_bytes": self.peak_sync_bytes,
            "pending": pending,
            **eager,
            **({"robust": self.reducer.state_dict()} if self.reducer is not None else {}),
            **({"error": [e.clone() for e in self.error]} if self.error else {}),
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
        for e, saved in zip(self.error, state.get("error", [])):
            if self._healing:
                e.zero_()
            else:
                e.copy_(saved)
        if self.eager:
            self._load_eager(state.get("eager"))
        pending = state["pending"]
        if pending is None or isinstance(pending, dict):  # checkpoints from before --outer eager
            pending = [] if pending is None else [pending]
        device = self.global_params[0][0].device
        self._pending = {}
        for p in pending:
            work = p["delta"]
            work = RuntimeError("the round failed before") if work is None else work.to(device)
            self._pending[int(p["fragment"])] = (int(p["due"]), work)

    @torch.no_grad()
    def _load_eager(self, saved: dict[str, Any] | None) -> None:
        """This worker's own eager state; a newcomer healing from a peer starts with none (its
        parameters are then theta_g: it has trained nothing of its own)."""
        self._fresh.clear()
        if saved is None or self._healing:
            for frag, s in zip(self.offset, self.sent):
                s.zero_()
                for o in frag:
                    o.zero_()
            self.offset_opt.state.clear()
            for g_frag, p_frag in zip(self.global_params, self.fragments):
                for g, p in zip(g_frag, p_frag):
                    p.copy_(g.to(p.dtype))
            return
        for frag, saved_frag in zip(self.offset, saved["offset"]):
            for o, s in zip(frag, saved_frag):
                o.copy_(s)
        self.offset_opt.load_state_dict(saved["offset_opt"])
        for s, saved_s in zip(self.sent, saved["sent"]):
            s.copy_(saved_s)


def _step_flat(opt: torch.optim.Optimizer, params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """One step of `opt` on `params` (some of its parameters) with `flat` as their gradient."""
    for group in opt.param_groups:
        for q in group["params"]:
            q.grad = None
    offset = 0
    for q in params:
        q.grad = flat[offset : offset + q.numel()].view_as(q).to(q.dtype)
        offset += q.numel()
    opt.step()
    for q in params:
        q.grad = None


class DiLoCo(StreamingDiLoCo):
    """DiLoCo: the whole model synchronised every H steps, no overlap (P = 1, TAU = 0)."""

    name = "diloco"
    Options = DiLoCoOptions
