"""Block attention kernels that return the log-sum-exp, their backward, and the LSE merge.

Shape suffixes: B batch, H query heads, K kv heads (H % K == 0, G = H // K), L query length,
M key length, D head dim.

Backends (`select_backend`):
    cudnn  aten._scaled_dot_product_cudnn_attention (+ _backward): the fastest on Hopper
    flash  aten._scaled_dot_product_flash_attention (+ _backward)
    math   matmul + logsumexp in fp32 (fp64 for fp64 inputs), with its own backward: the CPU
           path, and the GPU path for fp32/fp64 inputs
On CUDA, "auto" probes cuDNN, then flash, once per (device, dtype, head dim): a tiny forward and
backward is compared with the math path, and the first backend that runs and agrees is kept.
The fused kernels take kv heads repeated to H (GQA); their dk/dv are summed back over groups.

Every call is either full or square top-left causal (lowband.seqpar.layout.plan), so no kernel
ever sees a fully masked row; rows no call covers keep lse = -inf and output 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowband.errors import ConfigError

aten = torch.ops.aten
BACKENDS = ("auto", "cudnn", "flash", "math")
_chosen: dict[tuple, str] = {}
# (cum_seq_q, cum_seq_k, philox seed, philox offset) as the fused forward returned them, per
# (backend, device): the backward op wants them back; with dropout 0 their values are unused.
_aux: dict[tuple, tuple] = {}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators (outputs, LSE, gradients) are fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def select_backend(q: Tensor, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of: {BACKENDS}")
    fused_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend != "auto":
        if backend != "math" and not fused_ok:
            raise ConfigError(
                f"backend {backend} needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}"
            )
        return backend
    if not fused_ok:
        return "math"
    key = (q.device, q.dtype, q.shape[-1])
    if key not in _chosen:
        _chosen[key] = _probe(q)
    return _chosen[key]


@torch.autocast("cuda", enabled=False)
def _probe(q: Tensor) -> str:
    g = torch.Generator(device=q.device).manual_seed(0)
    B, H, K, L, D = 1, 2, 1, 128, q.shape[-1]
    t = [torch.randn(B, h, L, D, device=q.device, dtype=q.dtype, generator=g) for h in (H, K, K, H)]
    ref = block_forward(*t[:3], True, None, "math")
    ref_grads = block_backward(t[3], *t[:3], ref[0].to(q.dtype), ref[1], True, None, "math")
    for name in ("cudnn", "flash"):
        try:
            out, lse = block_forward(*t[:3], True, None, name)
            grads = block_backward(t[3], *t[:3], out, lse, True, None, name)
        except (RuntimeError, NotImplementedError):
            continue
        # The LSE is checked too: a ring merges blocks by it, a single block would not notice.
        good = (
            (out.float() - ref[0].float()).abs().max() < 0.05
            and (lse.float() - ref[1].float()).abs().max() < 0.05
            and all((a.float() - b.float()).abs().max() < 0.1 for a, b in zip(grads, ref_grads))
        )
        if good:
            return name
    return "math"


def _expand(kv_BKMD: Tensor, H: int) -> Tensor:
    K = kv_BKMD.shape[1]
    return kv_BKMD if K == H else kv_BKMD.repeat_interleave(H // K, dim=1)


def _fold(dkv_BHMD: Tensor, K: int) -> Tensor:
    B, H, M, D = dkv_BHMD.shape
    return dkv_BHMD if K == H else dkv_BHMD.view(B, K, H // K, M, D).sum(2)


def block_forward(
    q_BHLD: Tensor, k_BKMD: Tensor, v_BKMD: Tensor, causal: bool, scale: float | None, backend: str
) -> tuple[Tensor, Tensor]:
    """(out_BHLD in q's dtype, lse_BHL in acc_dtype) of one block; causal is square top-left."""
    B, H, L, D = q_BHLD.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    if backend == "math":
        return _math_forward(q_BHLD, k_BKMD, v_BKMD, causal, scale)
    k, v = _expand(k_BKMD, H), _expand(v_BKMD, H)
    if backend == "cudnn":
        # Sliced blocks are views with the full sequence's strides: hand cuDNN dense tensors
        # (a copy of O(L*D), next to the block's O(L*M*D) work).
        r = aten._scaled_dot_product_cudnn_attention(
            q_BHLD.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, False,
            scale=scale,
        )  # fmt: skip
        _aux[(backend, q_BHLD.device)] = (r[2], r[3], r[6], r[7])
        return r[0], _finite_or_empty(r[1].reshape(B, H, L).float())
    r = aten._scaled_dot_product_flash_attention(q_BHLD, k, v, 0.0, causal, False, scale=scale)
    _aux[(backend, q_BHLD.device)] = (r[2], r[3], r[6], r[7])
    return r[0], _finite_or_empty(r[1].float())


def _finite_or_empty(lse: Tensor) -> Tensor:
    """Fused kernels may report +inf for a row with no key (ALGORITHMS.md); the merge wants
    -inf there. The planner never hands them such rows; this keeps it so if one slips through."""
    return lse.masked_fill_(lse == math.inf, -math.inf)


def block_backward(
    dout_BHLD: Tensor,
    q_BHLD: Tensor,
    k_BKMD: Tensor,
    v_BKMD: Tensor,
    out_BHLD: Tensor,
    lse_BHL: Tensor,
    causal: bool,
    scale: float | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of one block given the GLOBAL (merged) out and lse of these query rows."""
    B, H, L, D = q_BHLD.shape
    K = k_BKMD.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    if backend == "math":
        return _math_backward(dout_BHLD, q_BHLD, k_BKMD, v_BKMD, out_BHLD, lse_BHL, causal, scale)
    k, v = _expand(k_BKMD, H), _expand(v_BKMD, H)
    dout, out = dout_BHLD.contiguous(), out_BHLD.to(q_BHLD.dtype).contiguous()
    M = k.shape[2]
    cum_q, cum_k, seed, offset = _aux[(backend, q_BHLD.device)]
    if backend == "cudnn":
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q_BHLD.contiguous(), k.contiguous(), v.contiguous(), out,
            lse_BHL.float().unsqueeze(-1).contiguous(), seed, offset, None, cum_q, cum_k, L, M,
            0.0, causal, scale=scale,
        )  # fmt: skip
    else:
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q_BHLD.contiguous(), k.contiguous(), v.contiguous(), out, lse_BHL.float().contiguous(), cum_q, cum_k, L, M, 0.0,
            causal, seed, offset, scale=scale,
        )  # fmt: skip
    return dq, _fold(dk, K), _fold(dv, K)


def _scores(q_BHLD: Tensor, k_BKMD: Tensor, causal: bool, scale: float) -> Tensor:
    """Scores B x K x G x L x M in acc_dtype, -inf above the diagonal when causal."""
    B, H, L, D = q_BHLD.shape
    K, M = k_BKMD.shape[1], k_BKMD.shape[2]
    ct = acc_dtype(q_BHLD.dtype)
    q = q_BHLD.to(ct).view(B, K, H // K, L, D)
    s = (q @ k_BKMD.to(ct)[:, :, None].transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(L, M, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return s


def _math_forward(q, k, v, causal, scale):
    B, H, L, D = q.shape
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse[..., None]) @ v.to(s.dtype)[:, :, None]
    return out.reshape(B, H, L, D).to(q.dtype), lse.reshape(B, H, L)


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    B, H, L, D = q.shape
    K = k.shape[1]
    s = _scores(q, k, causal, scale)
    ct = s.dtype
    p = torch.exp(s - lse.to(ct).view(B, K, H // K, L, 1))
    do = dout.to(ct).view(B, K, H // K, L, D)
    dv = (p.transpose(-1, -2) @ do).sum(2)
    dp = do @ v.to(ct)[:, :, None].transpose(-1, -2)
    delta = (do * out.to(ct).view(B, K, H // K, L, D)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ k.to(ct)[:, :, None]) * scale
    dk = (ds.transpose(-1, -2) @ q.to(ct).view(B, K, H // K, L, D)).sum(2) * scale
    return dq.reshape(B, H, L, D), dk, dv


def merge_(out_acc: Tensor, lse_acc: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """In place: (out_acc, lse_acc) <- merge with (out_b, lse_b), all rows of one slice.

    lse = logaddexp(lse_a, lse_b); out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)
    (ALGORITHMS.md). A row with both LSEs -inf stays (0, -inf) rather than turning into NaN.
    """
    diff = lse_b - lse_acc
    w = torch.sigmoid(torch.where(torch.isnan(diff), torch.zeros_like(diff), diff))
    w = torch.where(torch.isneginf(lse_b), torch.zeros_like(w), w)
    out_acc.lerp_(out_b.to(out_acc.dtype), w.unsqueeze(-1))  # out_a + w * (out_b - out_a)
    lse_acc.copy_(torch.logaddexp(lse_acc, lse_b))
