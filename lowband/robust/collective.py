"""`robust_all_reduce`: every rank gathers every rank's update and aggregates them robustly.

A Byzantine-robust rule needs the individual updates, not their sum, so this is an all-gather
(ring, (n-1) payloads sent and received per rank) instead of an all-reduce (2(n-1)/n of one):

    1. encode x with the codec (fp32 when None): one uint8 payload of P bytes;
    2. comm.all_gather the payloads: rank r receives everybody's;
    3. decode every payload, our own included, so each rank works from the same bytes;
    4. (simulation only) replace the attacker ranks' rows with attack(honest rows);
    5. run the aggregator on the stacked (n, V) tensor. Every rule first drops rows with NaN or
       inf (finite_rows), so one such worker cannot crash or poison any rank.

Steps 3-5 are deterministic functions of the same bytes, so the result is identical on every
rank, bit for bit (the attack's generator must be seeded the same on every rank). Bytes per rank:
(n - 1) * P sent and received, P = codec.payload_bytes(numel) (robust_all_reduce_bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lowband.comm import Codec, Comm, get_codec
from lowband.robust.aggregators import check_tolerance, finite_rows
from lowband.robust.attacks import apply_attack

__all__ = ["RobustReducer", "robust_all_reduce", "robust_all_reduce_bytes"]


def robust_all_reduce_bytes(numel: int, world_size: int, codec: Codec | None = None) -> int:
    """Bytes one rank sends (and receives) in robust_all_reduce: (n - 1) * payload."""
    codec = codec if codec is not None else get_codec("fp32")
    return (world_size - 1) * codec.payload_bytes(numel)


def robust_all_reduce(
    comm: Comm,
    x: Tensor,
    aggregator: Callable[[Tensor], Tensor],
    codec: Codec | None = None,
    *,
    attack: Callable[..., Tensor] | None = None,
    attackers: Sequence[int] = (),
    generator: torch.Generator | None = None,
    keep: Sequence[bool] | None = None,
    numel: int | None = None,
) -> Tensor:
    """Aggregate a 1-D fp32 tensor over comm's group with `aggregator` (steps in the docstring).

    With a codec that takes payloads (`codec.encoded`, a sparse update: lowband.comm.sparse), x is
    this rank's payload and `numel` the length of the update it stands for.

    Returns a new fp32 tensor, identical on every rank. attack/attackers simulate omniscient
    Byzantine ranks (lowband.robust.attacks): the wire still carries their real updates, and every
    rank replaces their rows before aggregating. keep (one flag per rank) drops the rows of ranks
    whose update does not count this round (an elastic worker that has just healed sends zeros).
    """
    codec = codec if codec is not None else get_codec("fp32")
    encoded = getattr(codec, "encoded", False)  # x is a payload already (a sparse update)
    if x.dim() != 1 or (x.dtype != torch.float32 and not encoded):
        raise ValueError(f"robust_all_reduce takes a 1-D float32 tensor, got {x.dim()}-D {x.dtype}")
    if encoded and numel is None:
        raise ValueError("robust_all_reduce of a payload needs numel")
    numel = x.numel() if numel is None else numel
    payload = codec.encode(x)
    gathered = [torch.empty_like(payload) for _ in range(comm.size)]
    comm.all_gather(gathered, payload)
    updates_NV = torch.stack([codec.decode(p, numel) for p in gathered])
    if attack is not None and attackers:
        updates_NV = apply_attack(updates_NV, attackers, attack, generator)
    if keep is not None and not all(keep):
        updates_NV = updates_NV[torch.tensor([bool(k) for k in keep])]
    return aggregator(updates_NV).to(torch.float32)


class RobustReducer:
    """robust_all_reduce with its options bound, for an algorithm that reduces once a round.

    DDP calls it on every step's gradient, DiLoCo on every fragment's pseudo-gradient. It keeps
    one aggregator per `key` (a fragment), since centered clipping carries its previous output from
    round to round. Simulated attackers (attack, attackers) draw their noise from a generator seeded
    by (seed, round, key), the same on every rank, so the aggregate stays identical everywhere.
    `last_rejected` counts the rows the last call's rule dropped as non-finite.
    """

    def __init__(
        self,
        comm: Comm,
        aggregate: str = "mean",
        f: int = 0,
        codec: Codec | None = None,
        *,
        attack: str | None = None,
        attackers: Sequence[int] = (),
        seed: int = 0,
        world_size: int | None = None,
        options: dict | None = None,
    ) -> None:
        from lowband.robust.aggregators import get_aggregator
        from lowband.robust.attacks import get_attack

        self.comm, self.aggregate, self.f, self.seed = comm, aggregate, f, seed
        self.n = world_size if world_size is not None else comm.size
        """The workers the rule is set up for (an elastic round checks its own count)."""
        self.codec = codec if codec is not None else get_codec("fp32")
        options = dict(options or {})  # the rule's own keyword arguments (krum's slack, ...)
        self._make = lambda: get_aggregator(aggregate, f=f, n=self.n, **options)
        self._make()  # the rule's precondition on (n, f), checked now
        self._aggregators: dict[int, Callable[[Tensor], Tensor]] = {}
        self.attack = get_attack(attack) if attack is not None else None
        self.attackers = tuple(attackers) if attack is not None else ()
        self.last_rejected = 0
        """Rows with NaN or inf that the last call's rule dropped (the same on every rank)."""

    def __call__(
        self,
        x: Tensor,
        round_: int,
        key: int = 0,
        *,
        comm: Comm | None = None,
        members: Sequence[int] | None = None,
        keep: Sequence[bool] | None = None,
        codec: Codec | None = None,
        numel: int | None = None,
    ) -> Tensor:
        """Aggregate x over `comm` (default: the reducer's own), encoded with `codec` (default:
        the reducer's own; a compressor's PayloadCodec when x is a sparse payload of `numel`).

        In an elastic round the Comm and its members change: `members` gives each rank's worker
        index (the attackers are the workers listed in `attackers`, whichever rank they have this
        round) and `keep` the ranks whose update counts. The rule's precondition on (n, f) is
        checked against the rows that count, so a quorum too small for the rule fails its round.
        """
        comm = comm if comm is not None else self.comm
        attackers = self.attackers
        if members is not None:
            seats = set(self.attackers)
            attackers = tuple(r for r, m in enumerate(members) if m in seats)
        rows = comm.size if keep is None else sum(bool(k) for k in keep)
        if rows != self.n:
            check_tolerance(self.aggregate, rows, self.f)
        if key not in self._aggregators:
            self._aggregators[key] = self._make()
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + round_) * 1_009 + key)
        rule = self._aggregators[key]

        def counted(updates_NV: Tensor) -> Tensor:
            self.last_rejected = finite_rows(updates_NV)[1]
            return rule(updates_NV)

        return robust_all_reduce(
            comm,
            x,
            counted,
            codec if codec is not None else self.codec,
            attack=self.attack,
            attackers=attackers,
            generator=gen,
            keep=keep,
            numel=numel,
        )

    def state_dict(self) -> dict[int, Tensor]:
        """Centered clipping's reference per key (the other rules keep no state)."""
        return {
            k: a.reference.clone()
            for k, a in self._aggregators.items()
            if getattr(a, "reference", None) is not None
        }

    def load_state_dict(self, state: dict[int, Tensor]) -> None:
        for k, ref in state.items():
            agg = self._aggregators.setdefault(k, self._make())
            agg.reference = ref.clone()

    def bytes_per_round(
        self, numel: int, world_size: int | None = None, codec: Codec | None = None
    ) -> int:
        """Bytes this rank sends for one call on `numel` values (in `codec`, default its own)."""
        n = world_size if world_size is not None else self.comm.size
        return robust_all_reduce_bytes(numel, n, codec if codec is not None else self.codec)
