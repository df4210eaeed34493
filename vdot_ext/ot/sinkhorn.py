"""Batched, memory-bounded log-domain Sinkhorn for ½‖a − b‖² costs, and the envelope gradient.

Problem (Cuturi 2013; Peyré & Cuturi, "Computational OT", §4.4 log-domain), for each
of P independent problems with clouds a ∈ R^{I×D}, b ∈ R^{J×D}, weights u, μ:

    W_ε(a, b) = min_{T ∈ Π(u, μ)} <T, C> + ε KL(T | u⊗μ),      C_ij = ½‖a_i − b_j‖²
    T_ij      = u_i μ_j exp((f_i + g_j − C_ij) / ε)               (f, g: dual potentials)

Half-iterations (c-transforms), written so the heavy part is a matrix product:

    f_i ← −ε LSE_j(log μ_j + (g_j − C_ij)/ε) = ½‖a_i‖² − ε LSE_j(a_i·b_j/ε + log μ_j + (g_j − ½‖b_j‖²)/ε)
    g_j ← −ε LSE_i(log u_i + (f_i − C_ij)/ε) = ½‖b_j‖² − ε LSE_i(b_j·a_i/ε + log u_i + (f_i − ½‖a_i‖²)/ε)

Order: f from g = 0, then ``iters`` times (g, f) — the sequence f¹ g¹ … g⁶⁰ f⁶¹ of the
VDOT paper's Algorithm 2 plus one last f half-step, so the returned plan has exact
row sums (T1 = u) and its column error ‖Tᵀ1 − μ‖₁ is the convergence measure.

Envelope theorem (VDOT eq. 8): ∇_{a_i} W_ε = Σ_j T*_ij (a_i − b_j) = a_i (T*1)_i − (T* b)_i; the
barycentric term T*b is the same attention pass with values b (one more streaming pass,
no autograd through the iterations).

Numerics: each cloud is centred on its own mean first. ½‖a_i − b_j‖² = ½‖a'_i − b'_j‖² + s_i + t_j
with a' = a − ā, b' = b − b̄, δ = ā − b̄, s_i = a'_i·δ + ½‖δ‖², t_j = −b'_j·δ, and separable terms
do not change the plan, so the solver runs on (a', b') — no cancellation for far-apart or
offset clouds — and adds s, t back to the potentials. Scores are float32 at least
(float64 for float64 inputs), autocast off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .cpu_kernel import MIN_COLUMN_MASS
from .streaming import DEFAULT_BLOCK_ELEMS, resolve_backend, softmin_pass

__all__ = ['SinkhornResult', 'sinkhorn', 'envelope_gradient', 'marginal_errors', 'TOL_FLOOR']

# Smallest column-marginal L1 tolerance accepted per compute dtype: float32 plans
# stall near 1e-5 (DESIGN §9), float64 far lower.
TOL_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}

# Over-relaxation (Thibault et al. 2017 "Overrelaxed Sinkhorn-Knopp"; Lehmann et al. 2021
# "A note on overrelaxation in the Sinkhorn algorithm"): ω* = 2 / (1 + sqrt(1 − θ)) from
# the observed contraction θ of plain iterations; capped, started only after a plain warm-up.
_RELAX_WARMUP = 10
_RELAX_WINDOW = 5
_RELAX_MAX = 1.8
_RELAX_GUARD = 2.0


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn`. Potentials are for the original (uncentred) cost C."""
    f: Tensor                         # [P, I] dual potential of a (cost units)
    g: Tensor                         # [P, J] dual potential of b
    iters: int                        # full (g, f) iterations done
    row_err: Tensor                   # [P] ‖T1 − u‖₁ of the returned plan
    col_err: Tensor                   # [P] ‖Tᵀ1 − μ‖₁ of the returned plan
    epsilon: float
    converged: Optional[bool] = None  # tolerance mode: every problem reached tol
    gradient: Optional[Tensor] = None  # [P, I, D] envelope gradient Σ_j T_ij (a_i − b_j), if asked
    plan: Optional[Tensor] = None      # [P, I, J], only if return_plan=True
    backend: str = ''                  # the backend that ran ('fused_cpu', 'sdpa', 'blocked', 'triton')
    exact_g_steps: int = 0             # 'fused_cpu': g half-steps redone in the log domain (mass underflow)
    annealing_iters: int = 0           # eps_scaling: iterations at ε_k > ε (included in iters)


def _log_weights(w: Optional[Tensor], P: int, N: int, name: str, dtype, device) -> Tensor:
    if w is None:
        return torch.full((P, N), -math.log(N), dtype=dtype, device=device)
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(P, -1)
    if tuple(w.shape) != (P, N):
        raise ValueError(f'{name} must have shape [{P}, {N}] or [{N}], got {tuple(w.shape)}')
    w = w.to(device=device, dtype=dtype)
    if not torch.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f'{name} must be finite and > 0 (zero-weight points: drop them instead)')
    # normalised to probability vectors (balanced OT needs equal masses)
    return w.log() - w.sum(dim=1, keepdim=True).log()


def marginal_errors_from_potentials(new: Tensor, old: Tensor, log_w: Tensor, epsilon: float) -> Tensor:
    """‖marginal − w‖₁ given a potential ``old`` and its c-transform ``new`` (same side).

    marginal_k = w_k exp((old_k − new_k)/ε), so the L1 error is Σ_k w_k |expm1((old_k − new_k)/ε)|.
    The exponent is clamped at 80 so an early, far-off state reports a huge finite error.
    """
    z = ((old - new) / epsilon).clamp(max=80.0)
    return (log_w.exp() * torch.expm1(z).abs()).sum(dim=1)


def marginal_errors(plan: Tensor, a_weights: Optional[Tensor] = None,
                    b_weights: Optional[Tensor] = None) -> tuple:
    """(row_err [P], col_err [P]) of a materialised plan [P, I, J], in float64."""
    plan = plan.double()
    P, I, J = plan.shape
    u = _log_weights(a_weights, P, I, 'a_weights', torch.float64, plan.device).exp()
    mu = _log_weights(b_weights, P, J, 'b_weights', torch.float64, plan.device).exp()
    return (plan.sum(2) - u).abs().sum(1), (plan.sum(1) - mu).abs().sum(1)


def sinkhorn(a: Tensor, b: Tensor, epsilon: float, *, num_iters: Optional[int] = None,
             tol: Optional[float] = None, max_iters: int = 5000,
             a_weights: Optional[Tensor] = None, b_weights: Optional[Tensor] = None,
             overrelaxation: Union[str, float, None] = 'auto', return_gradient: bool = False,
             return_plan: bool = False, backend: str = 'auto',
             block_elems: int = DEFAULT_BLOCK_ELEMS, eps_scaling: Optional[float] = None) -> SinkhornResult:
    """Solve P entropic OT problems ½‖a_i − b_j‖² in one call, log domain, streaming.

    Args:
        a: [P, I, D] source clouds (any float dtype; computed in float32, float64 if given float64).
        b: [P, J, D] target clouds.
        epsilon: entropic regularisation ε > 0 (cost units).
        num_iters: fixed number of (g, f) iterations (default 60, the VDOT paper setting);
            exclusive with ``tol``.
        tol: tolerance mode: iterate until every problem's column-marginal L1 error ≤ tol
            (rows are exact by construction) or ``max_iters``; must be ≥ TOL_FLOOR[dtype].
        a_weights, b_weights: [P, I] / [P, J] (or 1-D shared) positive weights, normalised;
            default uniform.
        overrelaxation: 'auto' (tolerance mode only: adaptive ω after a plain warm-up, guarded),
            None / 1.0 (plain Sinkhorn), or a fixed ω in [1, 2) used after the warm-up.
        return_gradient: also return the envelope gradient Σ_j T_ij (a_i − b_j) [P, I, D].
        return_plan: also materialise the plan [P, I, J] (memory I·J per problem).
        backend: 'auto' | 'fused_cpu' (one C kernel call per (f, g) iteration, float32 CPU) |
            'sdpa' (CPU flash-attention kernel per half-step) | 'triton' (fused CUDA kernel) |
            'blocked' (baddbmm blocks, any device).
        block_elems: score elements held at once by the blocked backend.
        eps_scaling: tolerance mode only: ε-annealing factor q ∈ (0, 1). Before iterating at ε, one
            (f, g) iteration at each of ε_k = ε_0 q^k > ε, ε_0 = ½ (max‖a'‖ + max‖b'‖)² (the largest
            cost of the centred clouds), warm-starting the potentials (Kosowsky & Yuille 1994;
            Schmitzer 2019; geomloss' ``scaling``). These iterations count in ``iters``.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f'a must be [P, I, D] and b [P, J, D] with the same P and D; '
                         f'got {tuple(a.shape)} and {tuple(b.shape)}')
    if a.device != b.device:
        raise ValueError(f'a and b must be on one device, got {a.device} and {b.device}')
    epsilon = float(epsilon)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f'epsilon must be a finite positive number, got {epsilon}')
    if tol is not None and num_iters is not None:
        raise ValueError('give num_iters (fixed iterations) or tol (tolerance mode), not both')
    dtype = torch.float64 if (a.dtype == torch.float64 or b.dtype == torch.float64) else torch.float32
    if tol is not None:
        tol = float(tol)
        if not tol >= TOL_FLOOR[dtype]:
            raise ValueError(f'tol={tol} is below the {dtype} marginal-error floor {TOL_FLOOR[dtype]:g} '
                             '(L1); it could never be reached')
        if max_iters < 1:
            raise ValueError(f'max_iters must be >= 1, got {max_iters}')
        n_max = int(max_iters)
        if eps_scaling is not None and not 0.0 < float(eps_scaling) < 1.0:
            raise ValueError(f'eps_scaling must be in (0, 1), got {eps_scaling}')
    else:
        if eps_scaling is not None:
            raise ValueError('eps_scaling is a tolerance-mode option (give tol): with a fixed '
                             'iteration count the annealing would change what num_iters means')
        n_max = 60 if num_iters is None else int(num_iters)
        if n_max < 0:
            raise ValueError(f'num_iters must be >= 0, got {num_iters}')
    if overrelaxation == 'auto':
        relax_fixed = None
        relax_on = tol is not None
    elif overrelaxation is None:
        relax_fixed, relax_on = 1.0, False
    else:
        relax_fixed = float(overrelaxation)
        if not 1.0 <= relax_fixed < 2.0:
            raise ValueError(f"overrelaxation must be 'auto', None or a float in [1, 2), got {overrelaxation}")
        relax_on = relax_fixed > 1.0
    backend = resolve_backend(backend, a.device, dtype)

    P, I, D = a.shape
    J = b.shape[1]
    device = a.device
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        a = a.detach().to(dtype)
        b = b.detach().to(dtype)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError('a and b must be finite (got NaN or Inf)')
        log_u = _log_weights(a_weights, P, I, 'a_weights', dtype, device)
        log_mu = _log_weights(b_weights, P, J, 'b_weights', dtype, device)

        # centre each cloud (translation invariance, see module docstring)
        a_mean = a.mean(dim=1, keepdim=True)
        b_mean = b.mean(dim=1, keepdim=True)
        ac = (a - a_mean).contiguous()
        bc = (b - b_mean).contiguous()
        delta = a_mean - b_mean                                    # [P, 1, D]
        half_sq_a = 0.5 * ac.square().sum(-1)                      # ½‖a'_i‖²
        half_sq_b = 0.5 * bc.square().sum(-1)                      # ½‖b'_j‖²
        eps = epsilon

        pass_backend = 'sdpa' if backend == 'fused_cpu' else backend
        exact_g_steps = 0

        def f_update(g, e):   # f_i = ½‖a_i‖² − ε LSE_j(a_i·b_j/ε + log μ_j + (g_j − ½‖b_j‖²)/ε)
            lse, _ = softmin_pass(ac, bc, log_mu + (g - half_sq_b) / e, e, backend=pass_backend,
                                  block_elems=block_elems)
            return half_sq_a - e * lse

        def g_update(f, e):   # g_j = ½‖b_j‖² − ε LSE_i(b_j·a_i/ε + log u_i + (f_i − ½‖a_i‖²)/ε)
            lse, _ = softmin_pass(bc, ac, log_u + (f - half_sq_a) / e, e, backend=pass_backend,
                                  block_elems=block_elems)
            return half_sq_b - e * lse

        fused = None
        if backend == 'fused_cpu':
            from .cpu_kernel import FusedCPUIteration
            fused = FusedCPUIteration(ac, bc, log_u)

        def f_then_g(g, f_old=None, omega=None, e=eps):
            """One iteration from g at ε = e: f_new = F(g); f = f_old + ω (f_new − f_old) (f_new if
            no f_old); g_next = G(f). Returns (f, f_new, g_next)."""
            nonlocal exact_g_steps
            if fused is None:
                f_new = f_update(g, e)
                f = f_new if f_old is None else f_old + omega * (f_new - f_old)
                return f, f_new, g_update(f, e)
            # fused CPU kernel: L = row LSE (→ f_new) and the column masses M of the plan with the
            # new f, so that G(f)_j = g_j + ε (log μ_j − log M_j)   (see csrc/sinkhorn_cpu.c)
            h = log_mu + (g - half_sq_b) / e
            q = None if f_old is None else (f_old - half_sq_a) / e
            lse, mass = fused(h, e, q, None if f_old is None else omega)
            f_new = half_sq_a - e * lse
            f = f_new if f_old is None else f_old + omega * (f_new - f_old)
            if not bool((torch.isfinite(mass) & (mass >= MIN_COLUMN_MASS)).all()):
                exact_g_steps += 1
                return f, f_new, g_update(f, e)
            g_next = (g.double() + e * (log_mu.double() - mass.log())).to(dtype)
            return f, f_new, g_next

        g = torch.zeros(P, J, dtype=dtype, device=device)
        iters = 0
        if eps_scaling is not None:
            # ε-annealing: ε_0 = ½ (max‖a'‖ + max‖b'‖)² ≥ every centred cost, then ε_k = ε_0 q^k > ε
            e = 0.5 * float(ac.norm(dim=-1).amax() + bc.norm(dim=-1).amax()) ** 2
            while e > eps:
                _, _, g = f_then_g(g, e=e)
                iters += 1
                e *= float(eps_scaling)
        annealing_iters = iters
        f, f_new, g_next = f_then_g(g)
        omega = torch.ones(P, 1, dtype=dtype, device=device)
        omega_cap = torch.full((P, 1), _RELAX_MAX if relax_fixed is None else relax_fixed,
                               dtype=dtype, device=device)
        errs = []              # per-iteration column errors [P] (tolerance mode)
        plain_since = torch.zeros(P, dtype=torch.long, device=device)  # plain iterations in a row
        col_err = None
        converged = None
        while True:
            if tol is not None:
                col_err = marginal_errors_from_potentials(g_next, g, log_mu, eps)
                if bool((col_err <= tol).all()):
                    if bool((omega != 1).any()):
                        # the last f was relaxed (rows not exact): finish with a plain f step
                        f, f_new, g_next = f_then_g(g)
                        col_err = marginal_errors_from_potentials(g_next, g, log_mu, eps)
                        omega.fill_(1.0)
                        plain_since.zero_()
                        if bool((col_err <= tol).all()):
                            converged = True
                            break
                    else:
                        converged = True
                        break
                if iters >= n_max:
                    if bool((omega != 1).any()):
                        f, f_new, g_next = f_then_g(g)
                        col_err = marginal_errors_from_potentials(g_next, g, log_mu, eps)
                    converged = bool((col_err <= tol).all())
                    break
                if relax_on:
                    errs.append(col_err)
                    omega, plain_since = _adapt_relaxation(errs, omega, omega_cap, plain_since,
                                                           relax_fixed)
            elif iters >= n_max:
                break
            if relax_on and tol is None:
                # fixed-iteration mode with a user ω: plain warm-up, then ω
                if iters >= _RELAX_WARMUP:
                    omega.fill_(relax_fixed)
            # over-relaxed updates in the log domain: x ← x + ω (c-transform − x)
            if relax_on:
                g = g + omega * (g_next - g)
                f, f_new, g_next = f_then_g(g, f, omega)
            else:
                g = g_next
                f, f_new, g_next = f_then_g(g)
            iters += 1
        if tol is None:
            if relax_on:
                f, f_new, g_next = f_then_g(g)
            col_err = marginal_errors_from_potentials(g_next, g, log_mu, eps)

        # row sums of the returned plan from F(g) (= f_new, the last f half-step before any
        # relaxation) and, if asked, one more pass for the barycentric term T b' (values = b'):
        # envelope gradient g_i = (T1)_i (a'_i + δ) − (T b')_i  (= Σ_j T_ij (a_i − b_j))
        f_cand, bary = f_new, None
        if return_gradient:
            lse, bary = softmin_pass(ac, bc, log_mu + (g - half_sq_b) / eps, eps, values=bc,
                                     backend=pass_backend, block_elems=block_elems)
            f_cand = half_sq_a - eps * lse
        row_mass = (log_u + ((f - f_cand) / eps).clamp(max=80.0)).exp()     # (T1)_i
        row_err = (row_mass - log_u.exp()).abs().sum(dim=1)
        gradient = None
        if return_gradient:
            gradient = row_mass.unsqueeze(-1) * (ac + delta - bary)
        plan = None
        if return_plan:
            cost = 0.5 * torch.cdist(ac, bc).square()
            plan = (log_u[:, :, None] + log_mu[:, None, :] + (f[:, :, None] + g[:, None, :] - cost) / eps).exp()
        # potentials of the original cost: f + s_i, g + t_j
        shift_a = (ac * delta).sum(-1) + 0.5 * delta.square().sum(-1)
        shift_b = -(bc * delta).sum(-1)
        return SinkhornResult(f=f + shift_a, g=g + shift_b, iters=iters, row_err=row_err, col_err=col_err,
                              epsilon=epsilon, converged=converged, gradient=gradient, plan=plan,
                              backend=backend, exact_g_steps=exact_g_steps, annealing_iters=annealing_iters)


def _adapt_relaxation(errs, omega, omega_cap, plain_since, relax_fixed):
    """Guarded adaptive ω per problem (tolerance mode).

    - plain (ω = 1) for the first iterations and after every reset;
    - after ``_RELAX_WINDOW`` plain iterations past the warm-up, θ = (e_t / e_{t−w})^{1/w} and
      ω = min(cap, 2 / (1 + sqrt(1 − θ))) (or the user's fixed ω);
    - guard: if the error exceeds twice the best seen while ω > 1, back to ω = 1 and halve the
      cap's excess (re-estimated after another plain window).
    """
    t = len(errs)
    e_now = errs[-1]
    plain = omega.squeeze(1) == 1
    plain_since = torch.where(plain, plain_since + 1, torch.zeros_like(plain_since))
    if t >= 2:
        # SOR errors oscillate, so the guard fires on real growth only: above twice the best so far
        best = torch.stack(errs[:-1]).amin(dim=0)
        grew = (~plain) & (e_now > _RELAX_GUARD * best)
        if bool(grew.any()):
            omega = torch.where(grew[:, None], torch.ones_like(omega), omega)
            omega_cap[grew] = 1.0 + 0.5 * (omega_cap[grew] - 1.0)   # in place: persists across calls
            plain_since = torch.where(grew, torch.zeros_like(plain_since), plain_since)
    if t > _RELAX_WARMUP:
        ready = (omega.squeeze(1) == 1) & (plain_since >= _RELAX_WINDOW)
        if bool(ready.any()):
            ratio = (errs[-1] / errs[-1 - _RELAX_WINDOW].clamp_min(1e-300)).clamp(0.0, 1.0)
            theta = ratio.pow(1.0 / _RELAX_WINDOW)
            if relax_fixed is None:
                w_opt = 2.0 / (1.0 + torch.sqrt((1.0 - theta).clamp_min(0.0)))
            else:
                w_opt = torch.full_like(theta, relax_fixed)
            w_new = torch.minimum(w_opt[:, None], omega_cap)
            # only relax problems that are actually contracting
            use = ready & (ratio < 1.0) & (w_new.squeeze(1) > 1.0)
            omega = torch.where(use[:, None], w_new, omega)
    return omega, plain_since


def envelope_gradient(a: Tensor, b: Tensor, result: SinkhornResult, *,
                      a_weights: Optional[Tensor] = None, b_weights: Optional[Tensor] = None,
                      backend: str = 'auto', block_elems: int = DEFAULT_BLOCK_ELEMS) -> Tensor:
    """∇_{a_i} W_ε = Σ_j T_ij (a_i − b_j) = a_i (T1)_i − (T b)_i for the plan of ``result``.

    One streaming pass (the barycentric projection is an attention product with values b).
    Same centring as :func:`sinkhorn`: T is invariant to it, a_i − b_j = a'_i − b'_j + δ.
    """
    P, I, D = a.shape
    J = b.shape[1]
    dtype = result.f.dtype
    eps = result.epsilon
    with torch.no_grad(), torch.autocast(device_type=a.device.type, enabled=False):
        a = a.detach().to(dtype)
        b = b.detach().to(dtype)
        log_u = _log_weights(a_weights, P, I, 'a_weights', dtype, a.device)
        log_mu = _log_weights(b_weights, P, J, 'b_weights', dtype, a.device)
        a_mean = a.mean(dim=1, keepdim=True)
        b_mean = b.mean(dim=1, keepdim=True)
        ac = (a - a_mean).contiguous()
        bc = (b - b_mean).contiguous()
        delta = a_mean - b_mean
        half_sq_a = 0.5 * ac.square().sum(-1)
        half_sq_b = 0.5 * bc.square().sum(-1)
        # back to the centred problem's potentials
        f = result.f - ((ac * delta).sum(-1) + 0.5 * delta.square().sum(-1))
        g = result.g + (bc * delta).sum(-1)
        lse, bary = softmin_pass(ac, bc, log_mu + (g - half_sq_b) / eps, eps, values=bc,
                                 backend=backend, block_elems=block_elems)
        row_mass = (log_u + ((f - (half_sq_a - eps * lse)) / eps).clamp(max=80.0)).exp()
        return row_mass.unsqueeze(-1) * (ac + delta - bary)
