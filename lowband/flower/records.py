"""Flat vectors <-> Flower ArrayRecords, and the compressed payloads of SCALLION and SCAFCOM."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from lowband.algorithms.scaffold import Compressor, _generator
from lowband.errors import ConfigError


def flatten(record: ArrayRecord) -> torch.Tensor:
    """The record's floating arrays as one flat tensor, in key order (fp64 if any array is)."""
    arrays = [record[k].numpy() for k in record]
    if not arrays or not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
        raise ConfigError("lowband.flower: the model's ArrayRecord must hold floating arrays only")
    dtype = np.result_type(*arrays)
    return torch.from_numpy(np.concatenate([a.astype(dtype).reshape(-1) for a in arrays]))


def unflatten(flat: torch.Tensor, like: ArrayRecord) -> ArrayRecord:
    """`flat` cut into `like`'s keys, shapes and dtypes."""
    out, offset = {}, 0
    for k in like:
        a = like[k].numpy()
        out[k] = Array(flat[offset : offset + a.size].numpy().astype(a.dtype).reshape(a.shape))
        offset += a.size
    return ArrayRecord(out)


def to_record(tensors: list[torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({str(i): Array(t.detach().numpy().copy()) for i, t in enumerate(tensors)})


def from_record(record: ArrayRecord) -> list[torch.Tensor]:
    return [torch.from_numpy(record[str(i)].numpy().copy()) for i in range(len(record))]


def nbytes(record: ArrayRecord) -> int:
    """The payload bytes of a record (its arrays' data, as lowband counts a send)."""
    return sum(record[k].numpy().nbytes for k in record)


def encode(comp: Compressor, v: torch.Tensor, gen: tuple[int, int, int]) -> list[torch.Tensor]:
    """The compressor's wire tensors for v; the identity sends v as it is (fp64 stays fp64)."""
    if type(comp) is Compressor:
        return [v]
    return comp.encode(v, _generator(*gen))


def decode(comp: Compressor, wire: list[torch.Tensor], d: int, gen) -> torch.Tensor:
    if type(comp) is Compressor:
        return wire[0]
    return comp.decode(wire, d, _generator(*gen))
