"""The shape every training algorithm shares, so that it plugs into any plain PyTorch loop.

Either call the two hooks yourself:

    loss.backward()
    algo.sync_gradients()     # DDP: average gradients across workers
    inner_opt.step()
    algo.step()               # DiLoCo-style: an outer step every H inner steps

or let the context manager install them as optimizer step hooks:

    with lowband.DDP(model, opt, comm) as algo:
        for x, y in data:
            model.loss(x, y).backward()
            opt.step()            # sync_gradients() runs before, step() after
            opt.zero_grad()
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, ClassVar

import torch
from torch import nn

from lowband.comm import Comm
from lowband.comm.sync import SyncGroup, as_sync_group


def flat_params(params: list[torch.Tensor]) -> torch.Tensor:
    """The parameters as one new fp32 vector."""
    return torch.cat([p.detach().reshape(-1).float() for p in params])


@torch.no_grad()
def write_flat(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector back into the parameters (cast to each parameter's dtype)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()


def _check_optimizer_covers_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An inner optimizer that steps tensors which are not the model's parameters would move
    them outside every synchronisation: refuse it (ValueError naming the first one)."""
    own = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) not in own:
                raise ValueError(
                    f"the optimizer steps a tensor that is not a parameter of the model (param "
                    f"group {optimizer.param_groups.index(group)}, index {i}, shape "
                    f"{tuple(p.shape)}): lowband synchronises the model's parameters only"
                )


def parameter_digest(tensors: list[torch.Tensor]) -> int:
    """A 63-bit digest of the tensors' exact bytes (sha256), equal only for bit-identical values."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


@torch.no_grad()
def ensure_same_start(comm: Comm, groups: list[list[torch.Tensor]]) -> bool:
    """Make every worker hold rank 0's values, sending them only where they differ.

    Workers built from the same seed are already bit-identical: an all-gather of one 8-byte digest
    per worker proves it and no parameters travel. Otherwise rank 0 broadcasts every group.
    Returns True if a broadcast was needed.

    Its bytes are counted as usual, its time as start-up (`CommStats.setup`): the all-gather
    waits for the slowest worker to construct its algorithm, which says nothing about the
    algorithm's communication.
    """
    if comm.size == 1:
        return False
    with comm.stats.setup():
        return _same_start(comm, groups)


def _same_start(comm: Comm, groups: list[list[torch.Tensor]]) -> bool:
    mine = torch.tensor(
        [parameter_digest([t for g in groups for t in g])], dtype=torch.int64, device=comm.device
    )
    digests = [torch.empty_like(mine) for _ in range(comm.size)]
    comm.all_gather(digests, mine)
    if all(int(d) == int(mine) for d in digests) and len({int(d) for d in digests}) == 1:
        return False
    for group in groups:
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        comm.broadcast(flat, src=0)
        write_flat(group, flat)
    return True


@dataclasses.dataclass(kw_only=True)
class NoOptions:
    """An algorithm without options of its own."""


class Algorithm:
    """A training algorithm: a pure update rule plus the buffers and sync group it needs.

    A subclass declares, once:
      * `name`: its --algo name; defining it registers the class (lowband.algorithms.registry);
      * `Options`: a kw_only dataclass, one field per option with its default and a docstring
        under it; the CLI flags, --help and validation (`__post_init__`) come from it;
      * `supports`: the run-level features it works with ("robust": --aggregate/--attack,
        "stragglers": gradient coding, "straggler_delay", "seq_parallel"); every other
        combination is refused, with a reason, by the registry;
      * `from_options(model, optimizer, group, options, setup)`: how a run builds it (default:
        the constructor with the options as keywords).
    Its synchronisation is written once against `self.sync` (lowband.comm.sync): a round is
    `_sync_round(descriptor)`, which opens the round and runs `_continue_round(descriptor)`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    supports: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            from lowband.algorithms.registry import register

            register(cls)

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, group: Comm | SyncGroup
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        _check_optimizer_covers_model(model, optimizer)
        self.sync = as_sync_group(group)
        self.local_step = 0
        self.flip_labels: int | None = None
        """Label-flip attacker (--attack label-flip): the number of classes whose targets
        wrap_sampler flips; None on honest workers."""
        self.joining = False
        """Set by an elastic session on a newcomer: its first round hook heals it (join())."""
        self._round: Any = None
        """The round being opened (what a newcomer healing from this worker continues)."""
        self._hooks: list[Any] = []

    @property
    def comm(self) -> Comm:
        """The Comm of the current round (fixed in a static run; the quorum's in an elastic one)."""
        return self.sync.comm

    @classmethod
    def from_options(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group: Comm | SyncGroup,
        options: Any,
        setup: Any,
    ) -> Algorithm:
        """Build for a run: `options` is an instance of cls.Options, `setup` the run-level pieces
        (lowband.algorithms.registry.Setup: seed, robust reducer, straggler injector, code)."""
        return cls(model, optimizer, group, **dataclasses.asdict(options))

    # -- the two hooks of the loop --------------------------------------------------------------
    def sync_gradients(self) -> None:
        """Runs between backward and the inner optimizer's step."""

    def step(self) -> None:
        """Runs after the inner optimizer's step."""
        self.local_step += 1

    # -- rounds ---------------------------------------------------------------------------------
    def _sync_round(self, round_: Any) -> None:
        """Open a round and run it. Opening may heal this worker (an elastic group loads a live
        peer's state, this algorithm's included): it then runs the round its source is in."""
        self._round = round_
        self.sync.begin()
        round_, self._round = self._round, None
        self._continue_round(round_)

    def join(self) -> None:
        """A newcomer's first round hook, before it has trained: heal inside the quorum its peers
        are opening, then take part in their round."""
        self.joining = False
        self.sync.begin()  # an elastic group raises JobStateLost if nobody could heal this worker
        round_, self._round = self._round, None
        self._continue_round(round_)

    def _continue_round(self, round_: Any) -> None:
        """Everything of a round after it is opened: reduce, commit, apply or roll back."""
        raise NotImplementedError

    def wrap_sampler(self, sampler: Any) -> Any:
        """The loop's training batches go through this: the sampler, or a wrapper around it.

        A label-flip attacker's batches get flipped targets; gradient coding (CodedDDP) also
        takes the sampler's settings to draw the other data parts it computes.
        """
        if self.flip_labels is not None:
            from lowband.robust import LabelFlipSampler

            return LabelFlipSampler(sampler, self.flip_labels)
        return sampler

    def close(self) -> None:
        """Finish any communication still in flight."""

    def metrics(self) -> dict[str, Any]:
        """Extra fields for the metrics line (e.g. outer_step), the sync group's included."""
        return self.sync.metrics()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"local_step": self.local_step, "round": self._round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_step = int(state["local_step"])
        self._round = state.get("round")

    # -- context manager: install the hooks on the optimizer ------------------------------------
    def __enter__(self):
        step = self.step

        def called_twice(*_: Any, **__: Any) -> None:
            raise RuntimeError(
                f"{type(self).__name__}.step() called inside `with algo:`: the context manager "
                "already calls it after every optimizer step, so every outer step would run twice; "
                "remove the call from your loop (or drop the `with` and call sync_gradients() and "
                "step() yourself)"
            )

        self._hooks = [
            self.optimizer.register_step_pre_hook(lambda *_: self.sync_gradients()),
            self.optimizer.register_step_post_hook(lambda *_: step()),
        ]
        self.step = called_twice  # shadows the method until __exit__
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.__dict__.pop("step", None)
        self.close()
