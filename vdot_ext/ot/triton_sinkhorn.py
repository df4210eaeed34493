"""Fused CUDA softmin pass (Triton): one kernel per Sinkhorn half-iteration, FlashAttention-style.

For each query block, stream over key blocks with an online log-sum-exp (Milakov & Gimelshein
2018; FlashAttention, Dao et al. 2022):

    s_nm = x_n·y_m / ε + h_m
    m ← max(m, max_m s),  l ← l·e^{m_old − m} + Σ_m e^{s − m},  acc ← acc·e^{m_old − m} + Σ_m e^{s − m} v_m
    lse_n = m + log l,  out_n = acc / l

Scores use IEEE fp32 dot products (``input_precision='ieee'``, no TF32): at small ε a score error
is multiplied by 1/ε inside the exponent (docs/DESIGN.md §9). Only taken for CUDA tensors
(:func:`vdot_ext.ot.streaming.resolve_backend`). The kernel is tested on CPU through Triton's
interpreter (``TRITON_INTERPRET=1``); it has not been run on a GPU in this project.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing (CPU-only torch builds)
    HAVE_TRITON = False

__all__ = ['HAVE_TRITON', 'softmin_triton']

if HAVE_TRITON:
    @triton.jit
    def _softmin_kernel(x_ptr, y_ptr, h_ptr, v_ptr, lse_ptr, out_ptr, inv_eps, N, M, D,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_V: tl.constexpr):
        pid_n = tl.program_id(0)
        p = tl.program_id(1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < N
        mask_d = offs_d < D
        x = tl.load(x_ptr + p * N * D + offs_n[:, None] * D + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full((BLOCK_N,), float('-inf'), tl.float32)
        l_i = tl.zeros((BLOCK_N,), tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            y = tl.load(y_ptr + p * M * D + offs_m[:, None] * D + offs_d[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            h = tl.load(h_ptr + p * M + offs_m, mask=mask_m, other=float('-inf'))
            s = tl.dot(x, tl.trans(y), input_precision='ieee') * inv_eps + h[None, :]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            e = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(e, axis=1)
            if HAS_V:
                v = tl.load(v_ptr + p * M * D + offs_m[:, None] * D + offs_d[None, :],
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(e, v, input_precision='ieee')
            m_i = m_new
        tl.store(lse_ptr + p * N + offs_n, m_i + tl.log(l_i), mask=mask_n)
        if HAS_V:
            tl.store(out_ptr + p * N * D + offs_n[:, None] * D + offs_d[None, :], acc / l_i[:, None],
                     mask=mask_n[:, None] & mask_d[None, :])


def softmin_triton(x: Tensor, y: Tensor, bias: Tensor, inv_eps: float, values: Optional[Tensor] = None,
                   block_n: int = 64, block_m: int = 64) -> Tuple[Tensor, Optional[Tensor]]:
    """lse[p, n] = LSE_m(x·y/ε + bias) and out = softmax · values, float32, one fused kernel."""
    if not HAVE_TRITON:
        raise RuntimeError('triton is not installed; use backend="blocked"')
    if x.dtype != torch.float32:
        raise ValueError(f'the Triton softmin kernel computes in float32, got {x.dtype}; '
                         'float64 problems use backend="blocked"')
    x, y, bias = x.contiguous(), y.contiguous(), bias.contiguous()
    P, N, D = x.shape
    M = y.shape[1]
    lse = torch.empty(P, N, device=x.device, dtype=torch.float32)
    has_v = values is not None
    out = torch.empty(P, N, D, device=x.device, dtype=torch.float32) if has_v else lse
    v = values.contiguous() if has_v else y
    block_d = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(N, block_n), P)
    _softmin_kernel[grid](x, y, bias, v, lse, out, float(inv_eps), N, M, D,
                          BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, HAS_V=has_v)
    return lse, (out if has_v else None)
