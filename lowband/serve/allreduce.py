"""The all-reduces of tensor-parallel inference, and what the link model predicts for them.

tree: recursive doubling, log2 W hops of b bytes each (tree_all_reduce).

ring: `Comm.all_reduce` (Gloo): 2 (W - 1) latency hops, 2 (W - 1) / W b bytes per uplink.
star (TPI-LLM): every worker's partial goes to worker 0, which adds them in rank order and sends
the sum back. Two latency hops; 2 (W - 1) b through worker 0's link. Built from two
`Comm.all_to_all` calls on W x b buffers (docs/inference.md, section 2, says why and what that
costs in bytes):
    1. gather: chunk 0 of every worker's send buffer is its partial (the other chunks are
       zeros); worker 0 receives chunk j from worker j and adds them, j = 0, 1, ..., W - 1;
    2. scatter: worker 0 fills every chunk with the sum; every worker reads chunk 0.
No deadlock: both steps are collectives every worker enters in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowband.comm import Comm, LinkSpec
from lowband.comm.accounting import all_reduce_traffic, all_to_all_traffic


def ring_all_reduce(comm: Comm, t: Tensor) -> None:
    comm.all_reduce(t, op="sum")


def star_all_reduce(comm: Comm, t: Tensor) -> None:
    """In-place sum through worker 0 (steps 1-2 above)."""
    n = comm.size
    if n == 1:
        return
    flat = t.reshape(-1)
    m = flat.numel()
    send_NM = torch.zeros(n, m, dtype=t.dtype, device=t.device)
    send_NM[0] = flat
    recv_NM = torch.empty_like(send_NM)
    comm.all_to_all(recv_NM.view(-1), send_NM.view(-1))  # 1. gather at worker 0
    if comm.rank == 0:
        total = recv_NM[0].clone()
        for j in range(1, n):
            total += recv_NM[j]
        send_NM.copy_(total.expand(n, m))
    comm.all_to_all(recv_NM.view(-1), send_NM.view(-1))  # 2. scatter from worker 0
    t.copy_(recv_NM[0].view_as(t))


def tree_all_reduce(comm: Comm, t: Tensor) -> None:
    """In-place sum by recursive doubling: log2 W rounds; in round k worker r exchanges its
    partial sum with worker r XOR 2^k (a send and a receive posted together, so each round is one
    latency hop) and both add the lower rank's sum first, so the pair holds identical bits.
    W must be a power of two (validate_generate says so before any worker starts)."""
    n, r = comm.size, comm.rank
    k = 1
    while k < n:
        partner = r ^ k
        mine = t.contiguous().clone()
        theirs = torch.empty_like(mine)
        send = comm.send(mine, partner, async_op=True)
        comm.recv(theirs, partner)
        send.wait()
        t.copy_((mine + theirs) if r < partner else (theirs + mine))
        k *= 2


ALL_REDUCES: dict[str, Callable[[Comm, Tensor], None]] = {
    "ring": ring_all_reduce,
    "star": star_all_reduce,
    "tree": tree_all_reduce,
}


def predicted_seconds(kind: str, nbytes: int, workers: int, link: LinkSpec) -> float:
    """The link model's time for one all-reduce of `nbytes` (what Comm charges, without jitter)."""
    if workers == 1:
        return 0.0
    if kind == "ring":
        traffic = all_reduce_traffic(nbytes // 4, 4, 0, workers)
        return link.ideal_time(traffic.critical_bytes, traffic.rounds)
    if kind == "star":
        one = all_to_all_traffic(nbytes * workers // 4, 4, 0, workers)
        return 2 * link.ideal_time(one.critical_bytes, one.rounds)
    if kind == "tree":  # log2 W rounds of one b-byte message each way
        rounds = workers.bit_length() - 1
        return rounds * link.ideal_time(nbytes, 1)
    raise ValueError(f"unknown all-reduce {kind!r}")
