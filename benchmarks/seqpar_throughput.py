"""Forward+backward throughput of sequence-parallel attention, per GPU, against one GPU and
against PyTorch's context_parallel, measured in the same run.

GPU (any world size W; one process per GPU):
    torchrun --nproc-per-node 2 benchmarks/seqpar_throughput.py --out seqpar.jsonl --append
CPU smoke (2 Gloo processes started here, tiny sizes, fp32):
    python benchmarks/seqpar_throughput.py --smoke --out /tmp/seqpar.jsonl

FLOPs, one convention for every row: causal forward = 4*B*H*S^2*D / 2 (half the score matrix),
backward = 2.5 x forward, so forward+backward = 7*B*H*S^2*D. TFLOP/s per GPU = that / (seconds
* W); the single-GPU row does the whole sequence on one GPU (W = 1). Every rank runs it at the
same time on its own GPU; the slowest rank's time counts everywhere.

Rows: `single` (F.scaled_dot_product_attention on the full sequence, cuDNN backend when it
runs, else flash; the row says which), our ring / tokenring / ulysses / hybrid (backend from
lowband.seqpar.select_backend), and `torch_cp` (torch.distributed.tensor.experimental.
context_parallel over a 1-D DeviceMesh, load balancing on, same SDPA backend as `single`).
Before timing, each variant's output and gradients are compared with the single-device result
at a small length (`--check-len`); the relative error goes into the JSON line.

A failing row (say, heads not divisible for Ulysses) is recorded with its error and the run
goes on; process groups get `--timeout` seconds, so a lost peer ends the run instead of hanging.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowband.comm import Comm  # noqa: E402
from lowband.seqpar import (  # noqa: E402
    hybrid_attention,
    ring_attention,
    select_backend,
    token_ring_attention,
    ulysses_attention,
)
from lowband.seqpar.train import SeqParallel  # noqa: E402

VARIANTS = ("ring", "tokenring", "ulysses", "hybrid")
# max |error| / max |reference| over out, dq, dk, dv for a variant to count as correct
CHECK_TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="32768,65536,131072", help="total tokens per sequence")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hybrid-ulysses", type=int, default=2, help="Ulysses degree of hybrid")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-len", type=int, default=4096)
    p.add_argument("--no-torch-cp", action="store_true", help="skip context_parallel rows")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per collective")
    p.add_argument("--out", default="seqpar_throughput.jsonl", help="JSON lines, one per row")
    p.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="2 Gloo processes on CPU, tiny sizes")
    args = p.parse_args(argv)
    if args.smoke:
        args.seqs, args.heads, args.head_dim, args.check_len = "64,96", 4, 16, 32
        args.kv_heads = args.kv_heads or 2
        args.iters, args.warmup = 2, 1
    args.kv_heads = args.kv_heads or args.heads
    return args


def flops(S: int, H: int, D: int, B: int = 1) -> float:
    return 7.0 * B * H * S * S * D  # causal fwd 2*B*H*S^2*D, bwd 2.5x


class Bench:
    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.comm = Comm(dist.group.WORLD, device=device)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.gqa = args.kv_heads != args.heads  # enable_gqa only where needed (kernel choice)
        self.sdpa_backend = self._sdpa_backend()
        self.groups = {}
        for v in args.variants.split(","):
            cfg = types.SimpleNamespace(
                seq_parallel=v,
                cp=self.world,
                cp_ulysses=args.hybrid_ulysses if v == "hybrid" else None,
            )
            try:
                self.groups[v] = SeqParallel.from_config(cfg, self.comm, device)
            except Exception as e:  # noqa: BLE001 - recorded as the row's error
                self.groups[v] = e

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = torch.zeros(1, device=self.device)
        dist.all_reduce(t)

    def max_over_ranks(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def tensors(self, S: int):
        g = torch.Generator(device=self.device).manual_seed(S)
        a = self.args
        shapes = [(1, a.heads, S, a.head_dim)] + [(1, a.kv_heads, S, a.head_dim)] * 2
        shapes.append((1, a.heads, S, a.head_dim))
        return [torch.randn(s, generator=g, device=self.device, dtype=self.dtype) for s in shapes]

    def _sdpa_backend(self) -> str:
        if self.device.type != "cuda":
            return "math"
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, _ = (t[:, :, :256] for t in self.tensors(256))
        for name, be in (
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION),
        ):
            try:
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
                return name
            except RuntimeError:
                continue
        return "math"

    def _sdpa_ctx(self):
        from contextlib import nullcontext

        if self.device.type != "cuda":
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(
            self.sdpa_backend, SDPBackend.MATH
        )
        return sdpa_kernel([be])

    def time_it(self, step) -> float:
        for _ in range(self.args.warmup):
            step()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.args.iters):
            step()
        self.sync()
        return self.max_over_ranks((time.perf_counter() - t0) / self.args.iters)

    # -- rows ----------------------------------------------------------------------------------
    def single(self, S: int) -> dict:
        q, k, v, do = self.tensors(S)
        leaves = [t.requires_grad_() for t in (q, k, v)]

        def step():
            with self._sdpa_ctx():
                out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=self.gqa)
            out.backward(do)
            for t in leaves:
                t.grad = None

        s = self.time_it(step)
        return {"backend": self.sdpa_backend, "seconds": s, "gpus": 1}

    def _attn(self, variant: str):
        sp = self.groups[variant]
        if isinstance(sp, Exception):
            raise sp
        if variant == "ring":
            return lambda q, k, v: ring_attention(q, k, v, sp.cp_comm)
        if variant == "tokenring":
            return lambda q, k, v: token_ring_attention(q, k, v, sp.cp_comm)
        if variant == "ulysses":
            return lambda q, k, v: ulysses_attention(q, k, v, sp.cp_comm)
        return lambda q, k, v: hybrid_attention(q, k, v, sp.ulysses_comm, sp.ring_comm)

    def _local(self, variant: str, tensors):
        lay = self.groups[variant].layout
        return [lay.shard(t, 2, self.groups[variant].cp_comm.rank) for t in tensors]

    def check(self, variant: str) -> float:
        """max relative error of out, dq, dk, dv against the single-device result."""
        S = self.args.check_len
        full = self.tensors(S)
        leaves = [t.clone().requires_grad_() for t in full[:3]]
        with self._sdpa_ctx():
            ref = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=self.gqa)
        ref_all = [ref, *torch.autograd.grad(ref, leaves, full[3])]
        local = [t.requires_grad_() for t in self._local(variant, full[:3])]
        out = self._attn(variant)(*local)
        (do,) = self._local(variant, full[3:])
        got = [out, *torch.autograd.grad(out, local, do)]
        errs = []
        for a, b in zip(got, ref_all):
            (b,) = self._local(variant, [b])
            errs.append(((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
        return self.max_over_ranks(max(errs))

    def variant(self, variant: str, S: int) -> dict:
        fn = self._attn(variant)
        q, k, v, do = self._local(variant, self.tensors(S))
        leaves = [t.requires_grad_() for t in (q, k, v)]
        backend = select_backend(q)
        if backend == "math" and self.device.type == "cuda":
            raise RuntimeError(
                "neither cuDNN nor flash passed lowband.seqpar's probe on this GPU; the math "
                "path would hold S^2 scores, so this row is not timed"
            )

        def step():
            fn(*leaves).backward(do)
            for t in leaves:
                t.grad = None

        return {"backend": backend, "seconds": self.time_it(step), "gpus": self.world}

    def torch_cp(self, S: int) -> dict:
        if self.device.type != "cuda":
            raise RuntimeError(
                "skipped on CPU: context_parallel handles only SDPA's CUDA ops (flash, "
                "efficient, cuDNN); CPU SDPA runs a different op"
            )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cuda", (self.world,), mesh_dim_names=("cp",))
        q, k, v, do = self.tensors(S)
        bufs = [q, k, v, do]
        with context_parallel(
            mesh, buffers=bufs, buffer_seq_dims=[2] * 4, no_restore_buffers=set(bufs)
        ):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def step():
                with self._sdpa_ctx():
                    out = F.scaled_dot_product_attention(
                        *leaves, is_causal=True, enable_gqa=self.gqa
                    )
                out.backward(do)
                for t in leaves:
                    t.grad = None

            s = self.time_it(step)
        return {"backend": self.sdpa_backend, "seconds": s, "gpus": self.world}


def run(args, device: torch.device) -> list[dict]:
    b = Bench(args, device)
    a = args
    rows = []
    base = {
        "world": b.world,
        "heads": a.heads,
        "kv_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "dtype": str(b.dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    checks = {}
    for v in a.variants.split(","):
        try:
            checks[v] = b.check(v)
        except Exception as e:  # noqa: BLE001
            checks[v] = f"{type(e).__name__}: {e}".splitlines()[0]
    for S in (int(s) for s in a.seqs.split(",")):
        names = ["single", *a.variants.split(",")] + ([] if a.no_torch_cp else ["torch_cp"])
        for name in names:
            row = {**base, "variant": name, "seq_len": S}
            try:
                if name == "single":
                    r = b.single(S)
                elif name == "torch_cp":
                    r = b.torch_cp(S)
                else:
                    r = b.variant(name, S)
                    row["check_rel_err"] = checks[name]
                    ok = isinstance(checks[name], float) and checks[name] < CHECK_TOL[b.dtype]
                    row["check_ok"] = ok
                    if not ok and b.rank == 0:
                        print(f"CHECK FAILED: {name} vs single-device SDPA: {checks[name]}")
                row.update(r)
                row["tflops_per_gpu"] = (
                    flops(S, a.heads, a.head_dim) / r["seconds"] / r["gpus"] / 1e12
                )
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
                if b.rank == 0 and "skipped" not in row["error"]:
                    traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            if b.rank == 0:
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| tokens | variant | backend | ms fwd+bwd | TFLOP/s per GPU | vs single | vs torch_cp | check rel err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["seq_len"], r["variant"]): r for r in rows}
    for r in rows:
        single, cp = by.get((r["seq_len"], "single")), by.get((r["seq_len"], "torch_cp"))
        if "error" in r:
            lines.append(
                f"| {r['seq_len']:,} | {r['variant']} | - | - | - | - | - | {r['error']} |"
            )
            continue

        def ratio(row, other):
            ok = other and "error" not in other
            return f"{row['tflops_per_gpu'] / other['tflops_per_gpu']:.2f}x" if ok else "-"

        err = r.get("check_rel_err", "-")
        err = f"{err:.1e}" if isinstance(err, float) else err
        if r.get("check_ok") is False:
            err = f"FAILED {err}"
        lines.append(
            f"| {r['seq_len']:,} | {r['variant']} | {r['backend']} | {r['seconds'] * 1e3:.1f} | "
            f"{r['tflops_per_gpu']:.3g} | {ratio(r, single)} | {ratio(r, cp)} | {err} |"
        )
    return "\n".join(lines)


def worker(rank: int, world: int, port: int, args) -> None:
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not torchrun:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    use_cuda = torch.cuda.is_available() and not args.smoke
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=args.timeout),
        **({"device_id": device} if use_cuda else {}),
    )
    try:
        rows = run(args, device)
        if dist.get_rank() == 0:
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
            t = table(rows)
            print(t)
            if args.append:
                from _common import append_results

                append_results(
                    f"Sequence-parallel attention throughput, {dist.get_world_size()} ranks",
                    "torchrun --nproc-per-node "
                    f"{dist.get_world_size()} benchmarks/seqpar_throughput.py "
                    + " ".join(sys.argv[1:]),
                    t,
                )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    from _common import torchrun_or_smoke

    return torchrun_or_smoke(worker, parse(argv))


if __name__ == "__main__":
    sys.exit(main())
