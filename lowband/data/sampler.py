"""Deterministic, disjoint training windows per worker, and a fixed eval set.

Shape legend: B = batch size, L = sequence length (tokens per input row).

Why stateless: a worker that restarts from a checkpoint at step s, or joins a running job at step
s, must see exactly the batch it would have seen had it been there all along. `ShardSampler.batch`
is therefore a pure function of (seed, world_size, rank, step), with no iterator to fast-forward
and nothing to put in a checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from lowband.errors import ConfigError, DataError


class ShardSampler:
    """Worker `rank` of `world_size` draws training windows only from its own contiguous shard.

    The train tokens are cut into `world_size` equal contiguous ranges (the remainder, fewer than
    `world_size` tokens, is dropped). Rank r draws windows of `seq_len + 1` tokens lying fully
    inside its range, so no two workers ever train on the same token. Window starts are drawn
    uniformly with replacement from a generator seeded by (seed, world_size, rank, step).

    Raises:
        ConfigError: for a rank outside [0, world_size) or a non-positive size.
        DataError: if a shard is smaller than one window of `seq_len + 1` tokens.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seq_len: int,
        seed: int,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch size and seq len must be >= 1, got {batch_size}, {seq_len}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.tokens = tokens
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        shard_len = len(tokens) // world_size
        self.shard: tuple[int, int] = (rank * shard_len, (rank + 1) * shard_len)
        """[start, end) token indices of this rank's shard."""
        if shard_len < seq_len + 1:
            raise DataError(
                f"shard of rank {rank} holds {shard_len:,} tokens, need at least {seq_len + 1:,} "
                f"for seq_len {seq_len}; use fewer workers, a shorter --seq-len or a larger corpus"
            )

    def window_starts(self, step: int) -> np.ndarray:
        """The B int64 token indices where the windows of `batch(step)` begin."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        start, end = self.shard
        # Seeding from the whole tuple (not seed + step) keeps streams of neighbouring steps and
        # ranks statistically independent; world_size is in it because shards depend on it.
        rng = np.random.default_rng([self.seed, self.world_size, self.rank, step])
        # Last valid start is end - (seq_len + 1); integers() excludes its upper bound.
        return rng.integers(start, end - self.seq_len, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x_BL, y_BL)` int64 for training step `step`; `y_BL` is `x_BL` shifted left by one."""
        return _gather(self.tokens, self.window_starts(step), self.seq_len)

    def __repr__(self) -> str:
        return (
            f"ShardSampler(rank={self.rank}, world_size={self.world_size}, shard={self.shard}, "
            f"batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed})"
        )


def eval_batches(
    eval_tokens: np.ndarray, *, batch_size: int, seq_len: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of `(x_BL, y_BL)` eval batches, identical on every worker.

    Windows of `seq_len + 1` tokens never overlap and are spread evenly over the eval split, first
    window at its start, last one ending at its end. `num_batches` is clamped to what fits.

    Raises:
        DataError: if the eval split cannot hold even one batch of non-overlapping windows.
    """
    if batch_size < 1 or seq_len < 1 or num_batches < 1:
        raise ConfigError(
            f"batch size, seq len and eval batches must be >= 1, got "
            f"{batch_size}, {seq_len}, {num_batches}"
        )
    n, window = len(eval_tokens), seq_len + 1
    fits = n // window // batch_size
    if fits < 1:
        raise DataError(
            f"eval split holds {n:,} tokens, need at least {batch_size * window:,} for one batch of "
            f"{batch_size} x seq_len {seq_len}; use a larger eval split, a smaller batch or --seq-len"
        )
    k = min(num_batches, fits) * batch_size
    # Start i at floor(i * M / (k - 1)) with M = n - window. Consecutive starts differ by at
    # least floor(M / (k - 1)) >= window because k * window <= n, so windows never overlap.
    span = n - window
    starts = np.arange(k, dtype=np.int64) * span // max(k - 1, 1)
    x, y = _gather(eval_tokens, starts, seq_len)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, k, batch_size)]


def _gather(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Fancy indexing copies only the needed tokens, also out of a np.memmap.
    w = tokens[starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)].astype(np.int64)
    w_BL1 = torch.from_numpy(w)
    return w_BL1[:, :-1].contiguous(), w_BL1[:, 1:].contiguous()
