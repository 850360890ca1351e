"""Sequence parallelism in `lowband train`: groups, the model's attn_fn, sharding and the loss.

Ranks are split into context-parallel (cp) groups of `--cp` consecutive ranks; the ranks of one
group train on the same sequences, each holding its shard of every sequence, and the model's
attention runs over the group. Data parallelism runs across groups: the sampler draws by
(group index, number of groups). Gradients are then averaged over ALL ranks by DDP: a rank's
parameter gradient holds its share of d(sum of the group's shard losses), so the average over the
world is the gradient of the global mean loss. That is why `--seq-parallel` needs `--algo ddp`.

The loop calls three things: `SeqParallel.from_config`, `sp.attn_fn` for build_model, and
`sp.loss(model, x, y)` in place of `model.loss(x, y)` (also in evaluation). Off, they reduce to
the plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.seqpar.attention import (
    hybrid_attention,
    ring_attention,
    token_ring_attention,
    ulysses_attention,
)
from lowband.seqpar.layout import Layout

VARIANTS = ("ulysses", "ring", "tokenring", "hybrid")
_LAYOUT = {"ulysses": "contiguous", "ring": "zigzag", "tokenring": "zigzag", "hybrid": "hybrid"}


def check_options(cfg) -> None:
    """Reject impossible --seq-parallel / --cp combinations before any worker starts."""
    from lowband.models import PRESETS

    if cfg.seq_parallel is None:
        if cfg.cp != 1 or cfg.cp_ulysses is not None:
            raise ConfigError("--cp and --cp-ulysses need --seq-parallel")
        return
    if cfg.seq_parallel not in VARIANTS:
        raise ConfigError(
            f"unknown --seq-parallel {cfg.seq_parallel!r}; choose one of: {', '.join(VARIANTS)}"
        )
    if cfg.cp < 1 or cfg.workers % cfg.cp:
        raise ConfigError(f"--cp {cfg.cp} must be at least 1 and divide --workers {cfg.workers}")
    u = _ulysses_degree(cfg)
    layout = Layout(_LAYOUT[cfg.seq_parallel], cfg.cp, u)
    if cfg.seq_len % layout.multiple:
        raise ConfigError(
            f"--seq-len {cfg.seq_len} must be a multiple of {layout.multiple} for "
            f"--seq-parallel {cfg.seq_parallel} --cp {cfg.cp}"
        )
    if cfg.seq_parallel in ("ulysses", "hybrid") and cfg.model in PRESETS:
        m = PRESETS[cfg.model]
        if m.n_heads % u or (m.n_kv_heads % u and u % m.n_kv_heads):
            raise ConfigError(
                f"Ulysses degree {u} must divide the heads of --model {cfg.model} "
                f"({m.n_heads} query, {m.n_kv_heads} kv; or be a multiple of the kv heads)"
            )


def _ulysses_degree(cfg) -> int:
    if cfg.seq_parallel == "ulysses":
        return cfg.cp
    if cfg.seq_parallel != "hybrid":
        if cfg.cp_ulysses is not None:
            raise ConfigError("--cp-ulysses applies to --seq-parallel hybrid only")
        return 1
    u = cfg.cp_ulysses if cfg.cp_ulysses is not None else 2
    if u < 1 or cfg.cp % u:
        raise ConfigError(f"--cp-ulysses {u} must divide --cp {cfg.cp}")
    return u


class SeqParallel:
    """One rank's view: its cp group(s), its data-parallel coordinates, and how to shard."""

    def __init__(
        self,
        variant: str | None,
        cp_comm: Comm,
        *,
        dp_rank: int,
        dp_size: int,
        ulysses_comm: Comm | None = None,
        ring_comm: Comm | None = None,
    ) -> None:
        self.variant, self.cp_comm = variant, cp_comm
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.ulysses_comm, self.ring_comm = ulysses_comm, ring_comm
        if variant is not None and variant not in VARIANTS:
            raise ConfigError(f"unknown sequence parallelism {variant!r}")
        u = ulysses_comm.size if ulysses_comm is not None else 1
        self.layout = Layout(_LAYOUT[variant], cp_comm.size, u) if variant is not None else None
        self._calls = 0
        """Attention calls so far: the first checks that the group's shards match (one small
        all-gather, lowband.seqpar.agree); the rest repeat it, the same on every rank."""

    @classmethod
    def from_config(cls, cfg, comm: Comm, device: torch.device) -> SeqParallel:
        """Create the cp groups (every rank creates every group, in the same order)."""
        if cfg.seq_parallel is None:
            return cls(None, Comm(None), dp_rank=comm.rank, dp_size=comm.size)
        cp, world, rank = cfg.cp, comm.size, comm.rank
        u = _ulysses_degree(cfg)

        def make(ranks: list[int]) -> Comm | None:
            group = dist.new_group(ranks)  # collective over the world: every rank calls it
            return Comm(group, stats=comm.stats, device=device) if rank in ranks else None

        mine: dict[str, Comm] = {}
        for g in range(world // cp):
            base = g * cp
            if (c := make(list(range(base, base + cp)))) is not None:
                mine["cp"] = c
            if cfg.seq_parallel == "hybrid":
                for i in range(cp // u):
                    if (c := make([base + i * u + j for j in range(u)])) is not None:
                        mine["ulysses"] = c
                for j in range(u):
                    if (c := make([base + i * u + j for i in range(cp // u)])) is not None:
                        mine["ring"] = c
        return cls(
            cfg.seq_parallel,
            mine["cp"],
            dp_rank=rank // cp,
            dp_size=world // cp,
            ulysses_comm=mine.get("ulysses"),
            ring_comm=mine.get("ring"),
        )

    @property
    def attn_fn(self):
        """The model's AttnFn (None: the default single-rank SDPA)."""
        return None if self.variant is None else self._attention

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> Tensor:
        check, self._calls = self._calls == 0, self._calls + 1
        if self.variant == "ring":
            return ring_attention(q, k, v, self.cp_comm, causal=causal, check=check)
        if self.variant == "tokenring":
            return token_ring_attention(q, k, v, self.cp_comm, causal=causal, check=check)
        if self.variant == "ulysses":
            return ulysses_attention(q, k, v, self.cp_comm, causal=causal, check=check)
        return hybrid_attention(
            q, k, v, self.ulysses_comm, self.ring_comm, causal=causal, check=check
        )

    def shard(self, x_BL: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's tokens of full-length rows and their positions (for RoPE)."""
        L = x_BL.shape[1]
        rank = self.cp_comm.rank
        return self.layout.shard(x_BL, 1, rank), self.layout.positions(rank, L, x_BL.device)

    def loss(self, model, x_BL: Tensor, y_BL: Tensor) -> Tensor:
        """Mean next-token loss over the full rows. Its gradient is this rank's shard loss's (the
        others' arrive through the attention backward); its value is the cp group's mean."""
        if self.variant is None:
            return model.loss(x_BL, y_BL)
        x, pos = self.shard(x_BL)
        y, _ = self.shard(y_BL)
        local = model.loss(x, y, pos)
        mean = local.detach().clone()
        self.cp_comm.all_reduce(mean, op="avg")
        return local + (mean - local.detach())
