"""Dense log-domain Sinkhorn (VDOT paper Algorithm 2), float64 by default: the reference.

Materialises C_ij = ½‖a_i − b_j‖² (computed as a difference, no expansion) and the plan.
Memory O(P·I·J): for tests and small problems only. Same iteration order as
:func:`vdot_ext.ot.sinkhorn.sinkhorn` (f from g = 0, then (g, f) pairs); ``center=True``
also runs it on the mean-centred clouds like the streaming solver (same iterates),
``center=False`` is the paper's algorithm on the raw clouds (same fixed point).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ['ReferenceResult', 'sinkhorn_reference']


@dataclass
class ReferenceResult:
    f: Tensor          # [P, I], potentials of the raw cost: T = u μ exp((f + g − C)/ε)
    g: Tensor          # [P, J]
    plan: Tensor       # [P, I, J]
    gradient: Tensor   # [P, I, D]: Σ_j T_ij (a_i − b_j)
    iters: int
    row_err: Tensor    # [P]
    col_err: Tensor    # [P]


def sinkhorn_reference(a: Tensor, b: Tensor, epsilon: float, *, num_iters: Optional[int] = None,
                       tol: Optional[float] = None, max_iters: int = 100000,
                       a_weights: Optional[Tensor] = None, b_weights: Optional[Tensor] = None,
                       center: bool = False, dtype: torch.dtype = torch.float64) -> ReferenceResult:
    if tol is not None and num_iters is not None:
        raise ValueError('give num_iters or tol, not both')
    a = a.detach().to(dtype)
    b = b.detach().to(dtype)
    P, I, _ = a.shape
    J = b.shape[1]

    def log_w(w, n):
        if w is None:
            return torch.full((P, n), -math.log(n), dtype=dtype, device=a.device)
        w = w.to(dtype).expand(P, n)
        return w.log() - w.sum(1, keepdim=True).log()

    log_u, log_mu = log_w(a_weights, I), log_w(b_weights, J)
    if center:
        a_run = a - a.mean(1, keepdim=True)
        b_run = b - b.mean(1, keepdim=True)
    else:
        a_run, b_run = a, b
    cost = 0.5 * (a_run[:, :, None, :] - b_run[:, None, :, :]).square().sum(-1)   # [P, I, J]
    eps = float(epsilon)

    def f_of(g):   # f_i = −ε log Σ_j μ_j exp((g_j − C_ij)/ε)
        return -eps * torch.logsumexp(log_mu[:, None, :] + (g[:, None, :] - cost) / eps, dim=2)

    def g_of(f):   # g_j = −ε log Σ_i u_i exp((f_i − C_ij)/ε)
        return -eps * torch.logsumexp(log_u[:, :, None] + (f[:, :, None] - cost) / eps, dim=1)

    g = torch.zeros(P, J, dtype=dtype, device=a.device)
    f = f_of(g)
    n_max = max_iters if tol is not None else (60 if num_iters is None else num_iters)
    iters = 0
    while iters < n_max:
        g = g_of(f)
        f = f_of(g)
        iters += 1
        if tol is not None:
            plan = (log_u[:, :, None] + log_mu[:, None, :] + (f[:, :, None] + g[:, None, :] - cost) / eps).exp()
            if float((plan.sum(1) - log_mu.exp()).abs().sum(1).max()) <= tol:
                break
    plan = (log_u[:, :, None] + log_mu[:, None, :] + (f[:, :, None] + g[:, None, :] - cost) / eps).exp()
    if center:
        # back to raw-cost potentials: C_raw = C_centred + s_i + t_j
        am, bm = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
        delta = am - bm
        f = f + ((a - am) * delta).sum(-1) + 0.5 * delta.square().sum(-1)
        g = g - ((b - bm) * delta).sum(-1)
    gradient = plan.sum(2, keepdim=True) * a - plan @ b
    row_err = (plan.sum(2) - log_u.exp()).abs().sum(1)
    col_err = (plan.sum(1) - log_mu.exp()).abs().sum(1)
    return ReferenceResult(f=f, g=g, plan=plan, gradient=gradient, iters=iters, row_err=row_err,
                           col_err=col_err)
