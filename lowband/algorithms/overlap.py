"""Outer-step reductions that run in the background while inner steps go on."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import torch

from lowband.comm import Comm, quantized_all_reduce
from lowband.comm.codecs import Codec


class BackgroundReducer:
    """quantized_all_reduce on one background thread, results waited for in submission order.

    Used by Streaming DiLoCo (overlap TAU) and CO2 (one-round delay): the reduction's time is
    counted as background time, only the wait for its result as `outer_wait` (the exposed part).
    """

    def __init__(self, comm: Comm, codec: Codec) -> None:
        self.comm, self.codec = comm, codec
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(
        self,
        x: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        comm: Comm | None = None,
    ) -> concurrent.futures.Future:
        """Reduce x in the background over `comm` (default: the one given at construction; an
        elastic round passes its quorum's): the averaging quantized all-reduce, or `reduce(x)` (a
        robust all-gather, lowband.robust.RobustReducer)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="lowband-outer"
            )
        return self._executor.submit(self._reduce, x, reduce, comm or self.comm)

    def _reduce(self, x: torch.Tensor, reduce, comm: Comm) -> torch.Tensor:
        if x.is_cuda:  # a new thread starts on GPU 0: use the worker's GPU
            torch.cuda.set_device(x.device)
        with comm.background():
            if reduce is not None:
                return reduce(x)
            return quantized_all_reduce(comm, x, self.codec, op="avg")

    def result(self, work: concurrent.futures.Future | torch.Tensor) -> torch.Tensor:
        if not isinstance(work, concurrent.futures.Future):
            return work
        t0 = time.perf_counter()
        try:
            return work.result()
        finally:
            self.comm.stats.add("outer_wait", seconds=time.perf_counter() - t0)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
