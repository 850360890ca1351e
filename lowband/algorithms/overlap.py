"""Outer-step reductions that run in the background while inner steps go on."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from lowband.comm import Comm, quantized_all_reduce
from lowband.comm.codecs import Codec


class BackgroundReducer:
    """quantized_all_reduce on one background thread, results waited for in submission order.

    Used by Streaming DiLoCo (overlap TAU) and CO2 (one-round delay): the reduction's time is
    counted as background time, only the wait for its result as `outer_wait` (the exposed part).

    Its own group. A collective the caller's loop issues on the same process group while a
    background reduction is in flight (the everyday `dist.all_reduce(loss)` for logging) would be
    matched against the reduction's collectives in a different order on different ranks: both
    hang. So a reduction over the reducer's own static Comm runs on a private group of the same
    ranks, made on first use with `dist.new_group` (on the calling thread, at the same step on
    every rank, hence in the same order: new_group is itself a collective of the default world).
    A group that is not part of the default world (torchft's quorum groups, the thread-rank groups
    of tests) is used as given: nothing else runs on those.
    """

    def __init__(self, comm: Comm, codec: Codec) -> None:
        self.comm, self.codec = comm, codec
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._private: Comm | None = None

    def _comm_for(self, comm: Comm) -> Comm:
        if comm is not self.comm or comm.size == 1:
            return comm
        if self._private is None:
            try:
                ranks = dist.get_process_group_ranks(comm.group)
            except (RuntimeError, ValueError, AttributeError, KeyError):  # not of the default world
                self._private = comm
            else:
                self._private = comm.derive(dist.new_group(ranks))
        return self._private

    def submit(
        self,
        x: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        comm: Comm | None = None,
    ) -> concurrent.futures.Future:
        """Reduce x in the background over `comm` (default: the one given at construction; an
        elastic round passes its quorum's): the averaging quantized all-reduce, or
        `reduce(x, comm=...)` (a robust all-gather, lowband.robust.RobustReducer)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="lowband-outer"
            )
        return self._executor.submit(self._reduce, x, reduce, self._comm_for(comm or self.comm))

    def _reduce(self, x: torch.Tensor, reduce, comm: Comm) -> torch.Tensor:
        if x.is_cuda:  # a new thread starts on GPU 0: use the worker's GPU
            torch.cuda.set_device(x.device)
        with comm.background():
            if reduce is not None:
                return reduce(x, comm=comm)
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
