"""Streaming "softmin" passes: the one kernel of log-domain Sinkhorn.

Every half-iteration of squared-Euclidean log-domain Sinkhorn, and the envelope
gradient, is one call of

    lse_n = LSE_m( x_n·y_m / ε + h_m )                     (row log-sum-exp)
    out_n = Σ_m softmax_m( x_n·y_m / ε + h_m ) · v_m       (optional, barycentric term)

because ½‖x − y‖² = ½‖x‖² + ½‖y‖² − x·y: the parts that depend on one side only
go into the per-key bias h (and back into the potential afterwards), so the
heavy part is a matrix product, i.e. attention with an additive key bias
(KeOps / geomloss "online" softmin; FlashAttention's log-sum-exp output).
The I×J score matrix is never held: either torch's fused CPU flash-attention
kernel streams over key blocks (``'sdpa'``), a fused Triton kernel does on CUDA
(``'triton'``, :mod:`vdot_ext.ot.triton_sinkhorn`), or a blocked ``baddbmm`` holds at
most ``block_elems`` scores at a time (``'blocked'``, any device).

The solver backend ``'fused_cpu'`` (:mod:`vdot_ext.ot.cpu_kernel`) goes one step further on
CPU: a whole (f, g) iteration per kernel call, one Gram product and one exponential per
score; its single passes (envelope gradient, exact g rescue) run on ``'sdpa'``.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ['softmin_pass', 'softmin_function', 'block_plan', 'available_backends', 'resolve_backend',
           'DEFAULT_BLOCK_ELEMS', 'EXP_CLAMP']

# 2**22 float32 scores = 16 MiB per block: large enough for GEMM efficiency,
# small enough to keep the peak extra memory of a 16k×16k problem far below 64 MB.
DEFAULT_BLOCK_ELEMS = 1 << 22

# exp(-80) ≈ 1.8e-35: clamping s − max at −80 changes a log-sum-exp by at most
# M·e^-80 (relative), but avoids subnormal results, for which CPU exp is 10–30× slower.
EXP_CLAMP = -80.0

_SDPA_CPU_OP = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)


def _triton_usable() -> bool:
    try:
        from .triton_sinkhorn import HAVE_TRITON
    except Exception:  # pragma: no cover
        return False
    return HAVE_TRITON


def _triton_interpreted() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def _fused_cpu_error() -> Optional[str]:
    from .cpu_kernel import kernel_error
    return kernel_error()


_warned_fused_cpu = False


def available_backends() -> Tuple[str, ...]:
    """Backend names accepted here (``'auto'`` resolves to one of them)."""
    names = ['blocked']
    if _SDPA_CPU_OP is not None:
        names.insert(0, 'sdpa')
    if _fused_cpu_error() is None:
        names.insert(0, 'fused_cpu')
    if _triton_usable():
        names.append('triton')
    return tuple(names)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'auto' → on CPU 'fused_cpu' for float32 when the kernel builds (fastest measured, see
    benchmarks/RESULTS.md), else 'sdpa' (with a warning saying why, once); on CUDA 'triton' for
    float32 when the triton package imports, else 'blocked'; 'blocked' for float64 anywhere.
    The Triton kernel passed benchmarks/gpu/run_checks.sh on an H200 (2026-11-30: the blocked
    path's accuracy, 11x faster at the paper's 21 x 1560^2 x 16; benchmarks/RESULTS.md).

    On CUDA the blocked path runs with TF32 disabled (IEEE fp32 scores): at small ε a
    TF32 / bf16 score error is multiplied by 1/ε inside the exponent (docs/DESIGN.md §9).
    """
    global _warned_fused_cpu
    if backend == 'auto':
        if device.type == 'cpu':
            if dtype == torch.float32:
                reason = _fused_cpu_error()
                if reason is None:
                    return 'fused_cpu'
                if not _warned_fused_cpu:
                    _warned_fused_cpu = True
                    warnings.warn(f'vdot_ext.ot: fused CPU Sinkhorn kernel unavailable ({reason}); '
                                  "using backend 'sdpa' (about 3-4x slower per iteration)", RuntimeWarning)
            return 'sdpa' if _SDPA_CPU_OP is not None else 'blocked'
        # CUDA: the fused Triton kernel for float32 (it passed the GPU check script, docs/DESIGN.md §9);
        # the IEEE-fp32 / float64 blocked path where Triton is missing or for float64
        if dtype == torch.float32 and _triton_usable():
            return 'triton'
        return 'blocked'
    if backend == 'fused_cpu':
        reason = _fused_cpu_error()
        if reason is not None:
            raise ValueError(f"backend='fused_cpu' is unavailable: {reason}")
        if device.type != 'cpu' or dtype != torch.float32:
            raise ValueError(f"backend='fused_cpu' runs float32 CPU tensors; got {dtype} on {device} "
                             "(use backend='auto')")
        if _SDPA_CPU_OP is None:
            raise ValueError("backend='fused_cpu' needs the CPU flash-attention op for its single passes, "
                             f'missing in torch {torch.__version__}; use backend="blocked"')
        return backend
    if backend == 'sdpa':
        if _SDPA_CPU_OP is None:
            raise ValueError("backend='sdpa' needs torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, "
                             f'missing in torch {torch.__version__}; use backend="blocked"')
        if device.type != 'cpu':
            raise ValueError(f"backend='sdpa' is the CPU flash-attention kernel; tensors are on {device}. "
                             "Use backend='auto' or 'blocked'")
        return backend
    if backend == 'triton':
        if not _triton_usable():
            raise ValueError("backend='triton' needs the triton package; use backend='blocked'")
        if device.type != 'cuda' and not _triton_interpreted():
            raise ValueError(f"backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
                             f'tensors are on {device}')
        if dtype != torch.float32:
            raise ValueError(f"backend='triton' computes in float32; got {dtype} (use 'blocked')")
        return backend
    if backend == 'blocked':
        return backend
    raise ValueError(f"backend must be one of 'auto', 'fused_cpu', 'sdpa', 'blocked', 'triton'; got {backend!r}")


def block_plan(num_problems: int, num_rows: int, num_cols: int,
               block_elems: int = DEFAULT_BLOCK_ELEMS) -> Iterator[Tuple[int, int, int, int]]:
    """Blocks ``(p0, p1, n0, n1)`` such that each holds at most ``max(block_elems, num_cols)`` scores.

    Whole problems are grouped when one fits (several small OT problems per GEMM),
    otherwise each problem is split into row blocks of ``block_elems // num_cols`` rows.
    """
    if block_elems < 1:
        raise ValueError(f'block_elems must be >= 1, got {block_elems}')
    per_problem = num_rows * num_cols
    if per_problem <= block_elems:
        step = max(1, block_elems // max(per_problem, 1))
        for p0 in range(0, num_problems, step):
            yield p0, min(num_problems, p0 + step), 0, num_rows
    else:
        rows = max(1, block_elems // num_cols)
        for p in range(num_problems):
            for n0 in range(0, num_rows, rows):
                yield p, p + 1, n0, min(num_rows, n0 + rows)


def _softmin_blocked(x: Tensor, y: Tensor, bias: Tensor, inv_eps: float, values: Optional[Tensor],
                     block_elems: int) -> Tuple[Tensor, Optional[Tensor]]:
    P, N, _ = x.shape
    M = y.shape[1]
    lse = x.new_empty(P, N)
    out = x.new_empty(P, N, values.shape[-1]) if values is not None else None
    y_t = y.transpose(1, 2)
    for p0, p1, n0, n1 in block_plan(P, N, M, block_elems):
        # s_nm = x_n·y_m/ε + h_m, one block, built in place
        s = torch.baddbmm(bias[p0:p1, None, :], x[p0:p1, n0:n1], y_t[p0:p1], alpha=inv_eps)
        s_max = s.amax(dim=-1, keepdim=True)
        s.sub_(s_max).clamp_(min=EXP_CLAMP).exp_()
        z = s.sum(dim=-1, keepdim=True)
        lse[p0:p1, n0:n1] = (s_max + z.log()).squeeze(-1)
        if out is not None:
            out[p0:p1, n0:n1] = torch.bmm(s, values[p0:p1]).div_(z)
    return lse, out


def _softmin_sdpa_cpu(x: Tensor, y: Tensor, bias: Tensor, inv_eps: float,
                      values: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    # The CPU flash kernel needs value head size == query head size; when only the
    # log-sum-exp is wanted, y itself serves as (ignored) values.
    v = values if values is not None else y
    out, lse = _SDPA_CPU_OP(x.unsqueeze(1), y.unsqueeze(1), v.unsqueeze(1), 0.0, False,
                            attn_mask=bias[:, None, None, :], scale=inv_eps)
    return lse.squeeze(1).to(x.dtype), (out.squeeze(1) if values is not None else None)


class _IEEEFloat32Matmul:
    """Disable TF32 for CUDA matmuls inside the block (restored on exit)."""

    def __enter__(self):
        self._prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._prev
        return False


def softmin_function(name: str, block_elems: int = DEFAULT_BLOCK_ELEMS) -> Callable:
    """The softmin kernel of a resolved backend ``name``: ``fn(x, y, bias, epsilon, values=None) → (lse, out)``.

    ``'fused_cpu'`` has no single pass of its own: its single passes (envelope gradient, exact g rescue) run on
    ``'sdpa'``.
    """
    if name in ('sdpa', 'fused_cpu'):
        def fn(x, y, bias, epsilon, values=None):
            return _softmin_sdpa_cpu(x, y, bias, 1.0 / float(epsilon), values)
    elif name == 'triton':
        from .triton_sinkhorn import softmin_triton

        def fn(x, y, bias, epsilon, values=None):
            return softmin_triton(x, y, bias, 1.0 / float(epsilon), values)
    elif name == 'blocked':
        def fn(x, y, bias, epsilon, values=None):
            if x.device.type == 'cuda':
                # portable path on CUDA, IEEE fp32 (docs/DESIGN.md §9)
                with _IEEEFloat32Matmul():
                    return _softmin_blocked(x, y, bias, 1.0 / float(epsilon), values, block_elems)
            return _softmin_blocked(x, y, bias, 1.0 / float(epsilon), values, block_elems)
    else:
        raise ValueError(f'unknown softmin backend {name!r}; resolve it with resolve_backend first')
    fn.backend = name
    return fn


def softmin_pass(x: Tensor, y: Tensor, bias: Tensor, epsilon: float, *, values: Optional[Tensor] = None,
                 backend: str = 'auto', block_elems: int = DEFAULT_BLOCK_ELEMS
                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """``lse[p, n] = LSE_m(x[p,n]·y[p,m]/ε + bias[p,m])`` and optionally ``out = softmax · values``.

    Args:
        x: [P, N, D] queries; y: [P, M, D] keys; bias: [P, M]; values: [P, M, D] or None.
        All float32 or float64 and on one device (the caller casts).
    Returns:
        (lse [P, N], out [P, N, D] or None).
    """
    if values is not None and values.shape[-1] != x.shape[-1]:
        raise ValueError(f'values must have the feature size of x ({x.shape[-1]}), got {values.shape[-1]}')
    name = resolve_backend(backend, x.device, x.dtype)
    return softmin_function(name, block_elems)(x, y, bias, epsilon, values)
