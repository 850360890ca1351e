"""Question: where does SparseLoCo's own time go at one sync, outside the link? The pieces of
one worker's sync for a fragment of N values, timed apart on one device:

  compress_   error feedback + per-chunk top-k + 2-bit codes + packing (foreground, every sync)
  to_host     the payload copied to the host (Gloo on a GPU stages through it)
  decode_all  unpacking and scattering the group's W payloads into the dense mean (the gather's
              receive side; in the background with --outer eager or --overlap)
  dense_own   decoding one's own payload (eager's local proxy)

    python benchmarks/sparse_codec_cost.py --numel 125000000 --workers 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowband.comm.sparse import TopK  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=125_000_000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--spec", default="topk:0.02:2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    topk = TopK.parse(args.spec)
    n, dev = args.numel, args.device
    error = torch.zeros(n, device=dev)
    delta = torch.randn(n, device=dev)
    payload = topk.compress_(error.clone(), delta, 0.95)
    payloads = [payload.clone() for _ in range(args.workers)]

    def decode_all():
        total = torch.zeros(n, device=dev)
        for q in payloads:
            total += topk.dense(*topk.unpack(q, n), n)
        return total.div_(len(payloads))

    rows = {
        "compress_": timed(lambda: topk.compress_(error, delta, 0.95), dev, args.repeats),
        "select (topk + codes)": timed(lambda: topk.select(delta), dev, args.repeats),
        "the stable sort select used before": timed(
            lambda: torch.sort(
                torch.nn.functional.pad(delta, (0, (-n) % topk.chunk)).view(-1, topk.chunk).abs(),
                dim=1,
                descending=True,
                stable=True,
            ).indices[:, : topk.k],
            dev,
            args.repeats,
        ),  # fmt: skip
        "to_host": timed(lambda: payload.cpu(), dev, args.repeats),
        "decode_all": timed(decode_all, dev, args.repeats),
        "dense_own": timed(lambda: topk.dense(*topk.unpack(payload, n), n), dev, args.repeats),
    }
    out = {"numel": n, "workers": args.workers, "spec": args.spec, "device": dev,
           "payload_bytes": payload.numel(), "ms": {k: 1e3 * v for k, v in rows.items()}}  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
