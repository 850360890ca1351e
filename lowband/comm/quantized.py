"""All-reduce whose wire carries only codec bytes: the quantized reduction of Streaming DiLoCo.

Casting to low precision and calling a plain all-reduce would sum in low precision at every hop
(and Gloo/NCCL cannot sum int4 at all). Instead, as ALGORITHMS.md "Streaming DiLoCo" asks:

    1. pad x with zeros to `size * chunk` elements, chunk = ceil(numel / (size*B)) * B with
       B = codec.block_size, so every chunk is whole blocks and all payloads have one size P;
    2. encode each chunk; all_to_all the payloads, so rank r receives everybody's chunk r
       (a reduce-scatter made of codec bytes);
    3. decode them and sum in fp32, in rank order 0..size-1 (divide by size for "avg");
    4. re-encode the reduced chunk, all_gather it, decode every rank's chunk, concatenate and
       drop the padding.

Every rank decodes the same bytes in step 4 (its own chunk included), so the result is identical
on every rank, bit for bit. The padding zeros travel as codec bytes like the rest: they are what
the wire carries, and `quantized_all_reduce_bytes` counts them.

Error (op="avg"), elementwise, with e = codec.error_bound, x_i rank i's input and
s = (1/n) sum_i decode(encode(x_i)) the fp32 reduction of step 3:

    |result - mean_i x_i|  <=  (1/n) sum_i e(x_i)  +  e(s)  +  (fp32 summation rounding of s)

(for op="sum" drop the 1/n on the first term). With the fp32 codec both e terms are 0 and the
result is an fp32 all-reduce up to summation order.

World size 1 runs the same code: Comm(None)'s all_to_all and all_gather are local copies that
count 0 bytes, so a single worker sees the same two-stage quantization as n workers (runs at
different n stay comparable), never the unquantized x.

`reference_quantized_all_reduce` is the textbook version on one process, every rank's input in a
list; the tests hold the distributed one to it bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowband.comm.codecs import Codec
from lowband.comm.group import Comm

__all__ = ["quantized_all_reduce", "quantized_all_reduce_bytes", "reference_quantized_all_reduce"]

_OPS = ("avg", "sum")


def _chunk_numel(numel: int, world_size: int, codec: Codec) -> int:
    """Elements per rank's chunk after padding: whole codec blocks, equal for every rank."""
    unit = world_size * codec.block_size
    return -(-numel // unit) * codec.block_size


def quantized_all_reduce_bytes(numel: int, world_size: int, codec: Codec) -> int:
    """Exact bytes one rank sends in quantized_all_reduce: all_to_all plus all_gather.

    Each sends (world_size - 1) payloads of P = codec.payload_bytes(chunk) bytes in each phase:
    2 (world_size - 1) P, with chunk = ceil(numel / (world_size*B)) * B. 0 for one rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    payload = codec.payload_bytes(_chunk_numel(numel, world_size, codec))
    return 2 * (world_size - 1) * payload


def quantized_all_reduce(comm: Comm, x: Tensor, codec: Codec, op: str = "avg") -> Tensor:
    """Reduce a 1-D fp32 tensor over comm's group with only codec bytes on the wire.

    Returns a new tensor (x is not modified), identical on every rank. op: "avg" or "sum".
    Every rank must pass the same numel and codec. Blocking; steps in the module docstring.
    """
    if op not in _OPS:
        raise ValueError(f"quantized_all_reduce op must be one of {_OPS}, got {op!r}")
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(
            f"quantized_all_reduce takes a 1-D float32 tensor, got {x.dim()}-D {x.dtype}"
        )
    n, numel = comm.size, x.numel()
    if numel == 0:
        return x.clone()
    chunk = _chunk_numel(numel, n, codec)
    payload = codec.payload_bytes(chunk)

    # 1-2. pad, encode chunk j into slot j, exchange: slot j of `recv` holds rank j's chunk `rank`.
    padded = torch.nn.functional.pad(x, (0, n * chunk - numel))
    send = torch.empty(n * payload, dtype=torch.uint8, device=x.device)
    for j in range(n):
        send[j * payload : (j + 1) * payload] = codec.encode(padded[j * chunk : (j + 1) * chunk])
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send)

    # 3. decode and reduce in fp32, in rank order.
    reduced = torch.zeros(chunk, dtype=torch.float32, device=x.device)
    for j in range(n):
        reduced += codec.decode(recv[j * payload : (j + 1) * payload], chunk)
    if op == "avg":
        reduced /= n

    # 4. re-encode, gather everybody's reduced chunk, decode all of them (our own included, so
    # every rank computes from the same bytes).
    gathered = [torch.empty(payload, dtype=torch.uint8, device=x.device) for _ in range(n)]
    comm.all_gather(gathered, codec.encode(reduced))
    return torch.cat([codec.decode(g, chunk) for g in gathered])[:numel]


def reference_quantized_all_reduce(xs: list[Tensor], codec: Codec, op: str = "avg") -> Tensor:
    """Textbook version of quantized_all_reduce on one process: xs[i] is rank i's input.

    Same padding, blocks and summation order, so it matches the distributed result bit for bit.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    n, numel = len(xs), xs[0].numel()
    if numel == 0:
        return xs[0].clone()
    chunk = _chunk_numel(numel, n, codec)
    total = n * chunk
    padded = [torch.nn.functional.pad(x, (0, total - numel)) for x in xs]
    # Chunks start at multiples of block_size, so coding the whole padded tensor codes each
    # chunk exactly as the distributed version does.
    s = torch.zeros(total, dtype=torch.float32, device=xs[0].device)
    for p in padded:
        s += codec.decode(codec.encode(p), total)
    if op == "avg":
        s /= n
    return codec.decode(codec.encode(s), total)[:numel]
