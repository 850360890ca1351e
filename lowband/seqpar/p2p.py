"""The transfers sequence parallelism needs, counted through `Comm`: paired send/recv and an
autograd all-to-all.

`exchange` posts a set of sends and receives at once and returns without waiting, so callers
post the next block's transfer before computing the current one (overlap). When the group is
registered with torch.distributed (a torchrun / init_process_group job) they go out as one
`torch.distributed.batch_isend_irecv`: NCCL groups them, so a pair of ranks sending to each
other cannot deadlock; their bytes are added to `comm.stats`, their wait time is not (on CUDA
the wait is on the stream). Groups made outside torch.distributed's registry (the threaded test
ranks of lowband.testing) use `Comm.send` / `Comm.recv`. Either way transfers are tagged, so
different streams between the same pair of ranks never match each other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from lowband.comm import Comm
from lowband.comm import accounting as acc


class Pending:
    """Handles of posted transfers; `wait()` blocks until all are done (idempotent). Holds the
    tensors until then, so a temporary handed to a send cannot be freed while on the wire."""

    def __init__(self, works: list, tensors: list[Tensor]) -> None:
        self._works, self._tensors = works, tensors

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works, self._tensors = [], []


def exchange(
    comm: Comm, sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]
) -> Pending:
    """Post sends (tensor, dst, tag) and receives (buffer, src, tag); group ranks, not global."""
    if _registered(comm.group):
        ops = [
            dist.P2POp(dist.isend, t, dist.get_global_rank(comm.group, r), comm.group, tag)
            for t, r, tag in sends
        ] + [
            dist.P2POp(dist.irecv, t, dist.get_global_rank(comm.group, r), comm.group, tag)
            for t, r, tag in recvs
        ]
        works = dist.batch_isend_irecv(ops) if ops else []
        for t, _, _ in sends:
            comm.stats.add("send", acc.p2p_traffic(t.numel(), t.element_size(), sending=True))
        for t, _, _ in recvs:
            comm.stats.add("recv", acc.p2p_traffic(t.numel(), t.element_size(), sending=False))
        return Pending(works, [t for t, _, _ in sends + recvs])
    works = [comm.send(t, r, tag, async_op=True) for t, r, tag in sends]
    works += [comm.recv(t, r, tag, async_op=True) for t, r, tag in recvs]
    return Pending(works, [t for t, _, _ in sends + recvs])


def _registered(group) -> bool:
    if group is None or not dist.is_initialized():
        return False
    try:
        dist.get_global_rank(group, 0)
    except (ValueError, RuntimeError):
        return False
    return True


def all_to_all(x: Tensor, comm: Comm, scatter_dim: int, gather_dim: int) -> Tensor:
    """Chunk i of x along scatter_dim goes to rank i; what rank j sent lands at chunk j along
    gather_dim. With autograd: the backward is the inverse all-to-all (dims swapped)."""
    return _AllToAll.apply(x, comm, scatter_dim, gather_dim)


def _all_to_all(x: Tensor, comm: Comm, scatter_dim: int, gather_dim: int) -> Tensor:
    send = torch.stack(x.chunk(comm.size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.comm, ctx.dims = comm, (scatter_dim, gather_dim)
        return _all_to_all(x, comm, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.comm, gather_dim, scatter_dim), None, None, None
