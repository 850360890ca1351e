"""Helpers for tests: n ranks as threads of one process, each with its own Gloo process group.

Threads start in milliseconds where processes take seconds to import torch, so most multi-rank
tests run this way (as torchft's do). Gloo and torch release the GIL in their kernels.
"""

from __future__ import annotations

import datetime
import threading
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from lowband.comm import Comm, LinkSpec


def gloo_groups(
    n: int, timeout_s: float = 60.0, prefix: str = "g"
) -> Callable[[int], dist.ProcessGroup]:
    """Returns make(rank) -> a Gloo group of n ranks sharing an in-process store."""
    store = dist.HashStore()

    def make(rank: int) -> dist.ProcessGroup:
        return dist.ProcessGroupGloo(
            dist.PrefixStore(prefix, store), rank, n, datetime.timedelta(seconds=timeout_s)
        )

    return make


def run_ranks(
    n: int,
    fn: Callable[..., Any],
    *args: Any,
    link: LinkSpec | None = None,
    timeout_s: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run fn(comm, *args, **kwargs) on n threads, one Comm each; return their results by rank.

    An exception on any rank is re-raised here with that rank's traceback.
    """
    make = gloo_groups(n, timeout_s=timeout_s)
    results: list[Any] = [None] * n
    errors: list[str] = []

    def body(rank: int) -> None:
        try:
            comm = Comm(make(rank) if n > 1 else None, link)
            results[rank] = fn(comm, *args, **kwargs)
        except BaseException:  # noqa: BLE001 - reported below with the rank
            errors.append(f"rank {rank}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"run_ranks: a rank did not finish within {timeout_s}s")
    if errors:
        raise RuntimeError("\n".join(errors))
    return results
