"""Sliding-window weight streaming (TPI-LLM's memory scheduler): layers live on disk, a window of
them in memory. docs/inference.md, section 4.

`stream_layers(model, folder, budget_bytes, max_len)` writes each of `model.layers` (a lowband
Transformer's blocks or a TPShard's) to `folder/layerNNN.pt` once, drops them from memory and puts
a `StreamedLayers` in their place. Iterating it (what every forward does, layer after layer):
    1. before layer 0: loads 0 .. w-1 are submitted to one background thread;
    2. layer i is handed to the caller when its load is done; the caller computes with it;
    3. when the caller asks for layer i + 1, every j <= i + w - 1 has been submitted: with the
       caller still holding layer i, at most w layers are alive (i, and i+1 .. i+w-1 loading or
       loaded); the caller drops i when it takes i + 1.
Disk reads overlap the compute (and the all-reduces) of the layers before them. Live layers are
counted by weakref finalizers, when the tensors are really freed; `peak_bytes` is the most alive
at once. Resident all the time, and counted against the budget: embedding, final norm, output
head, KV cache.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from lowband.errors import ConfigError


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter, buffer and plain tensor attribute of `module` and its children."""
    seen, total = set(), 0
    for m in module.modules():
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class StreamedLayers(nn.Module):
    """Stands in for a ModuleList of layers: `for i, layer in enumerate(streamed)` (steps 1-3)."""

    def __init__(self, files: list[Path], layer_bytes: list[int], window: int) -> None:
        super().__init__()
        self.files, self.layer_bytes, self.window = files, layer_bytes, window
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowband-prefetch")
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.loads = 0

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> nn.Module:
        layer = torch.load(self.files[i], weights_only=False)
        nbytes = self.layer_bytes[i]
        with self._lock:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.loads += 1
        weakref.finalize(layer, self._freed, nbytes)
        return layer

    def _freed(self, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes

    def __iter__(self):
        n, pending, submitted = len(self.files), deque(), 0

        def submit_up_to(last: int) -> int:
            nonlocal submitted
            while submitted <= min(last, n - 1):
                pending.append(self._pool.submit(self._load, submitted))
                submitted += 1
            return submitted

        submit_up_to(self.window - 1)  # 1.
        for i in range(n):
            if i:
                submit_up_to(i - 1 + self.window - 1)  # 3. the caller still holds layer i - 1
            yield pending.popleft().result()  # 2.


def stream_layers(
    model: nn.Module, folder: Path, budget_bytes: int, resident_bytes: int
) -> StreamedLayers:
    """Write model.layers to `folder`, replace them by a StreamedLayers whose window fits
    `budget_bytes` minus `resident_bytes`; ConfigError (one line) when two layers do not fit."""
    folder.mkdir(parents=True, exist_ok=True)
    files, sizes = [], []
    for i, layer in enumerate(model.layers):
        files.append(folder / f"layer{i:03d}.pt")
        torch.save(layer, files[-1])
        sizes.append(tensor_bytes(layer))
    room = budget_bytes - resident_bytes
    window = min(len(files), room // max(sizes)) if room > 0 else 0
    if window < 2:
        mb = 1 << 20
        raise ConfigError(
            f"--memory-budget {budget_bytes / mb:.1f} MB holds {max(window, 0)} layer(s) of "
            f"{max(sizes) / mb:.2f} MB next to the {resident_bytes / mb:.2f} MB always resident "
            "(embedding, head, KV cache); the sliding window needs 2"
        )
    streamed = StreamedLayers(files, sizes, window)
    model.layers = streamed  # the blocks in memory are dropped here
    return streamed
