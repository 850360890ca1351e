"""Placing a batch of variable-length sequences on ranks: one rank, or a context-parallel group.

We follow ByteScale's balance scheduler (Ge et al. 2025, "Hybrid Data Parallelism"): a sequence
that fits a rank's token capacity, and whose cost is below a balanced rank's share (total cost /
ranks), stays whole on one rank (no attention communication at all); a longer or costlier one
gets the smallest context-parallel group that holds it and brings its share under that target
(data-aware sharding); then
sequences are assigned largest-cost first to the least-loaded group of their size, so the
quadratic attention cost, not the token count, is what gets balanced. Groups are aligned blocks
of consecutive ranks (sizes dividing the rank count), as a static set of process groups needs.
After the greedy pass a trim pass moves single-rank sequences off the most loaded rank while
that lowers the maximum; if round-robin still does better (rare), its placement is kept.

Cost of a sequence of L tokens: a*L^2 + b*L (attention, linear layers), split evenly over its
group (zigzag sharding balances causal attention). b/a ~ 12 x model dim for a Llama block
(linear ~ 24 E^2 L, causal attention ~ 2 E L^2 FLOPs per layer): the default b = 24576 is the
1b preset's E = 2048.

Deterministic: ties break by sequence index and rank; no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowband.errors import ConfigError


def seq_cost(length: int, a: float = 1.0, b: float = 24576.0) -> float:
    return a * length * length + b * length


def shard_tokens(length: int, degree: int) -> int:
    """Tokens per rank of a sequence zigzag-sharded over `degree` ranks (padded to 2*degree)."""
    if degree == 1:
        return length
    return -(-length // (2 * degree)) * 2


@dataclass
class Placement:
    """Where the sequences went: `groups[i]` = the consecutive ranks holding sequence i."""

    groups: list[tuple[int, ...]]
    loads: list[float]
    """Cost per rank."""
    tokens: list[int]
    """Tokens per rank."""

    @property
    def max_load(self) -> float:
        return max(self.loads)

    @property
    def imbalance(self) -> float:
        """max / mean cost over ranks (1.0 is perfect)."""
        mean = sum(self.loads) / len(self.loads)
        return self.max_load / mean if mean > 0 else 1.0


@dataclass
class BalanceReport:
    balanced: Placement
    naive: Placement
    """Round-robin in arrival order: each sequence on the next group with room, split only where
    it exceeds the capacity (may overfill when nothing has room: it is only a baseline)."""
    notes: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"max cost {self.naive.max_load:.4g} -> {self.balanced.max_load:.4g} "
            f"({self.naive.max_load / self.balanced.max_load:.2f}x lower); imbalance max/mean "
            f"{self.naive.imbalance:.2f} -> {self.balanced.imbalance:.2f}"
        )


def _degrees(ranks: int) -> list[int]:
    return [d for d in range(1, ranks + 1) if ranks % d == 0]


def _degree(length: int, ranks: int, capacity: int) -> int:
    for d in _degrees(ranks):
        if shard_tokens(length, d) <= capacity:
            return d
    raise ConfigError(
        f"a sequence of {length:,} tokens does not fit {ranks} ranks of capacity {capacity:,} "
        f"tokens (at most {shard_tokens(length, ranks):,} per rank needed)"
    )


def _check(lengths, ranks: int, capacity: int) -> None:
    if ranks < 1 or capacity < 1:
        raise ConfigError(f"ranks and capacity must be >= 1, got {ranks}, {capacity}")
    if any(int(n) < 1 for n in lengths):
        raise ConfigError("sequence lengths must be >= 1")


def _room(tokens, group, need, capacity) -> bool:
    return all(tokens[r] + need <= capacity for r in group)


def balance(
    lengths: list[int], ranks: int, capacity: int, *, a: float = 1.0, b: float = 24576.0
) -> BalanceReport:
    """Balanced placement of `lengths` on `ranks` ranks of `capacity` tokens, with the naive one.

    Where the greedy pass finds no room for a sequence, a fallback packs by tokens or splits
    every sequence over all ranks (notes["fallback"] says which). Raises ConfigError if a
    sequence cannot fit even over all ranks, or no placement of the batch is found.
    """
    _check(lengths, ranks, capacity)
    lengths = [int(n) for n in lengths]
    costs = [seq_cost(n, a, b) for n in lengths]
    target = sum(costs) / ranks  # a perfectly balanced rank's cost
    # A sequence whose cost exceeds the target cannot be balanced on one rank: it gets the
    # smallest group over which its share fits the target (and its tokens the capacity).
    degrees = [
        max(_degree(n, ranks, capacity), next(d for d in _degrees(ranks) if c / d <= target))
        for n, c in zip(lengths, costs)
    ]
    order = sorted(range(len(lengths)), key=lambda i: (-seq_cost(lengths[i], a, b), i))
    loads, tokens = [0.0] * ranks, [0] * ranks
    groups: list[tuple[int, ...]] = [()] * len(lengths)
    for i in order:
        d = degrees[i]
        need, share = shard_tokens(lengths[i], d), seq_cost(lengths[i], a, b) / d
        while True:
            options = [tuple(range(s, s + d)) for s in range(0, ranks, d)]
            options = [g for g in options if _room(tokens, g, need, capacity)]
            if options:
                break
            if d == ranks:  # the greedy order left no room: a fallback may still fit
                return _fallback(lengths, ranks, capacity, a, b)
            d = next(x for x in _degrees(ranks) if x > d)  # spread wider where there is room
            need, share = shard_tokens(lengths[i], d), seq_cost(lengths[i], a, b) / d
        g = min(options, key=lambda g: (max(loads[r] for r in g), g[0]))
        groups[i] = g
        for r in g:
            loads[r] += share
            tokens[r] += need
    _trim(lengths, groups, loads, tokens, capacity, a, b)
    naive = _round_robin(
        lengths, [_degree(n, ranks, capacity) for n in lengths], ranks, capacity, a, b
    )
    balanced = Placement(groups, loads, tokens)
    if max(naive.tokens) <= capacity and naive.max_load < balanced.max_load:
        # Greedy largest-first is a heuristic: on rare inputs round-robin does better. Keep the
        # better one, so the balanced placement is never worse than the baseline.
        balanced = Placement(list(naive.groups), list(naive.loads), list(naive.tokens))
    return BalanceReport(balanced, naive)


def _fallback(lengths, ranks, capacity, a, b) -> BalanceReport:
    """Where the greedy pass finds no room for a sequence, a placement may still fit: pack by
    tokens alone (largest first, each on the fullest group it fits at its smallest degree, else a
    wider one; failing that a bounded search), or split every sequence over all ranks (an equal
    share of every sequence and of the cost on every rank), whichever fits with the lower maximum
    cost. ConfigError when none fits: "does not fit" only where the tokens exceed the ranks'
    capacity, else "found no placement", with what splitting over all ranks would need."""
    costs = [seq_cost(n, a, b) for n in lengths]
    found = []
    packed = _pack(lengths, ranks, capacity) or _search(lengths, ranks, capacity)
    if packed is not None:
        loads = [0.0] * ranks
        for g, c in zip(packed.groups, costs):
            for r in g:
                loads[r] += c / len(g)
        found.append(("packed by tokens", Placement(packed.groups, loads, packed.tokens)))
    need = sum(shard_tokens(n, ranks) for n in lengths)
    if need <= capacity:
        everyone = tuple(range(ranks))
        spread = Placement([everyone] * len(lengths), [sum(costs) / ranks] * ranks, [need] * ranks)
        found.append(("split over all ranks", spread))
    if not found:
        total = sum(lengths)
        if total > ranks * capacity:
            raise ConfigError(
                f"the batch ({total:,} tokens) does not fit {ranks} ranks of {capacity:,} tokens"
            )
        raise ConfigError(
            f"found no placement of the batch ({total:,} tokens) on {ranks} ranks of "
            f"{capacity:,} tokens: split over all ranks it needs {need:,} tokens per rank, and "
            "neither packing nor a bounded search found room; raise the capacity or use fewer "
            "sequences per batch"
        )
    naive = _round_robin(
        lengths, [_degree(n, ranks, capacity) for n in lengths], ranks, capacity, a, b
    )
    if max(naive.tokens) <= capacity:  # as in balance(): never worse than the baseline
        found.append(
            ("round-robin", Placement(list(naive.groups), list(naive.loads), list(naive.tokens)))
        )
    how, best = min(found, key=lambda item: item[1].max_load)
    return BalanceReport(best, naive, {"fallback": how})


def _pack(lengths, ranks, capacity) -> Placement | None:
    """Best-fit decreasing by tokens; None if some sequence finds no room."""
    tokens = [0] * ranks
    groups: list[tuple[int, ...]] = [()] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for d in _degrees(ranks):
            need = shard_tokens(lengths[i], d)
            fits = [
                tuple(range(s, s + d))
                for s in range(0, ranks, d)
                if _room(tokens, tuple(range(s, s + d)), need, capacity)
            ]
            if fits:
                g = max(fits, key=lambda g: (max(tokens[r] for r in g), -g[0]))  # the fullest
                groups[i] = g
                for r in g:
                    tokens[r] += need
                break
        else:
            return None
    return Placement(groups, [0.0] * ranks, tokens)


def _search(lengths, ranks, capacity, budget: int = 20_000) -> Placement | None:
    """Depth-first search over every sequence's aligned groups (largest first), at most `budget`
    placements tried: finds room where packing greedily does not, on small batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    options = [
        [
            (tuple(range(s, s + d)), shard_tokens(lengths[i], d))
            for d in _degrees(ranks)
            for s in range(0, ranks, d)
        ]
        for i in order
    ]
    tokens, groups, tried = [0] * ranks, [()] * len(lengths), 0

    def place(k: int) -> bool:
        nonlocal tried
        if k == len(order):
            return True
        for g, need in options[k]:
            tried += 1
            if tried > budget:
                return False
            if _room(tokens, g, need, capacity):
                for r in g:
                    tokens[r] += need
                groups[order[k]] = g
                if place(k + 1):
                    return True
                for r in g:
                    tokens[r] -= need
        return False

    return Placement(groups, [0.0] * ranks, tokens) if place(0) else None


def _trim(lengths, groups, loads, tokens, capacity, a, b) -> None:
    """Move single-rank sequences off the most loaded rank while that lowers the maximum."""
    for _ in range(4 * len(lengths)):
        top = max(range(len(loads)), key=lambda r: (loads[r], -r))
        low = min(range(len(loads)), key=lambda r: (loads[r], r))
        movable = [
            i
            for i, g in enumerate(groups)
            if g == (top,)
            and tokens[low] + lengths[i] <= capacity
            and loads[low] + seq_cost(lengths[i], a, b) < loads[top]
        ]
        if not movable:
            return
        i = max(movable, key=lambda i: (seq_cost(lengths[i], a, b), -i))
        c = seq_cost(lengths[i], a, b)
        # Moving the largest that keeps low below top's old load strictly lowers max(top, low).
        groups[i] = (low,)
        loads[top] -= c
        loads[low] += c
        tokens[top] -= lengths[i]
        tokens[low] += lengths[i]


def _round_robin(lengths, degrees, ranks, capacity, a, b) -> Placement:
    loads, tokens = [0.0] * ranks, [0] * ranks
    groups: list[tuple[int, ...]] = []
    ptr = 0
    for n, d in zip(lengths, degrees):
        need = shard_tokens(n, d)
        for step in range(ranks):  # next aligned group with room, from the pointer on
            start = ((ptr + step) // d * d) % ranks
            g = tuple(range(start, start + d))
            if _room(tokens, g, need, capacity):
                break
        else:
            g = tuple(range(start, start + d))  # no room anywhere: naive overfills
        groups.append(g)
        for r in g:
            loads[r] += seq_cost(n, a, b) / d
            tokens[r] += need
        ptr = g[-1] + 1
    return Placement(groups, loads, tokens)
