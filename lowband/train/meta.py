"""What a run records about where and with what it ran."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import lowband


def git_commit() -> str | None:
    """The commit of the lowband source tree (with '-dirty' if it has uncommitted changes)."""
    root = Path(lowband.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def gpu_sharing(world_size: int, device: torch.device, backend: str) -> dict | None:
    """How many workers share each GPU, when several do (lowband.launch.local.gpu_of: Gloo on
    GPUs means sharing); None otherwise."""
    if device.type != "cuda" or backend != "gloo" or world_size < 2:
        return None
    gpus = max(1, min(torch.cuda.device_count(), world_size))
    return {
        "workers": world_size,
        "gpus": gpus,
        "note": f"{world_size} workers share {gpus} GPU(s): wall-clock, tokens/s and compute "
        "time reflect the sharing, not one GPU per worker",
    }


def run_meta(
    *, corpus, model_params: int, world_size: int, device: torch.device, backend: str
) -> dict:
    sharing = gpu_sharing(world_size, device, backend)
    return {
        **({"gpu_sharing": sharing} if sharing else {}),
        "lowband_version": lowband.__version__,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "device": device_name(device),
        "backend": backend,
        "git_commit": git_commit(),
        "corpus": {
            "name": corpus.name,
            "sha256": corpus.sha256,
            "num_tokens": int(len(corpus.tokens)),
            "description": corpus.description,
        },
        "model_params": model_params,
        "world_size": world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
