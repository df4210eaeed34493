"""Batched, memory-bounded log-domain Sinkhorn for ½‖a − b‖² costs, and the envelope gradient.

Problem (Cuturi 2013; Peyré & Cuturi, "Computational OT", §4.4 log-domain; docs/DESIGN.md §5, Eq. 12), for each
of P independent problems with clouds a ∈ R^{I×D}, b ∈ R^{J×D}, weights u, μ:

    W_ε(a, b) = min_{T ∈ Π(u, μ)} <T, C> + ε KL(T | u⊗μ),      C_ij = ½‖a_i − b_j‖²
    T_ij      = u_i μ_j exp((f_i + g_j − C_ij) / ε)               (f, g: dual potentials)

**ε is in units of the cost ½‖a − b‖²** (the VDOT paper's eq. 8 cost, whose gradient is Σ_j T_ij (a_i − b_j)).
The public VDOT code applies ε = 0.1 to ‖a − b‖² (``cdist²``): the same plan as ε = 0.05 here.

The driver is the paper's Algorithm 2 (log-domain Sinkhorn), one loop around a swappable step
(:mod:`vdot_ext.ot.steps`; geomloss' ``sinkhorn_loop(softmin, …)``):

    g ← 0;  for ε_k in the ε-schedule: one iteration at ε_k                  (ε-scaling, optional)
    f ← F(g)                                                                  (Algorithm 2, line 14)
    repeat until the stopping rule holds:                                     (fixed count, or tolerance)
        g ← g + ω (G(f) − g)                                                  (line 20; ω = 1: plain)
        f ← f + ω (F(g) − f)                                                  (line 14)
    a relaxed last f is replaced by F(g), so the plan's rows are exact (T1 = u)

i.e. the sequence f¹ g¹ … g⁶⁰ f⁶¹ for 60 iterations. The returned marginal errors are the true ones of the
returned plan (f, g): rows from F(g) recomputed after the loop, columns from one log-sum-exp over the plan's
columns (``Iterate.z``), computed in float64 when the problem needs it (:mod:`vdot_ext.ot.problem`).

Envelope theorem (VDOT eq. 8; docs/DESIGN.md §5, Eq. 13): ∇_{a_i} W_ε = Σ_j T*_ij (a_i − b_j) = a_i (T*1)_i − (T* b)_i;
the barycentric term T*b is the same attention pass with values b (one more streaming pass, no autograd through
the iterations).

Example (two points onto two points, ε small: the plan is the identity matching):

>>> import torch
>>> a = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
>>> r = sinkhorn(a, a + 0.1, 0.01, tol=1e-10, return_gradient=True)
>>> r.gradient.squeeze(-1)    # Σ_j T_ij (a_i − b_j) = ½·(−0.1) per point
tensor([[-0.0500, -0.0500]], dtype=torch.float64)
>>> round(float(r.transport_cost), 6)   # <T, C> = Σ ½ (½·0.1²)
0.005
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .problem import CentredProblem, checked_inputs, choose_precision, log_weights
from .schedule import FixedIterations, Tolerance, check_overrelaxation, epsilon_schedule, l1_error, make_relaxation
from .steps import SinkhornStep, make_step
from .streaming import DEFAULT_BLOCK_ELEMS

__all__ = ['SinkhornResult', 'sinkhorn', 'envelope_gradient', 'marginal_errors', 'TOL_FLOOR']

# Smallest column-marginal L1 tolerance accepted per compute dtype: float32 plans
# stall near 1e-5 (docs/DESIGN.md §9), float64 far lower.
TOL_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn`. Potentials are for the original (uncentred) cost C; tensors are in
    ``compute_dtype`` (float64 when the problem needed it, see :mod:`vdot_ext.ot.problem`)."""
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
    dual_value: Optional[Tensor] = None      # [P] float64 <u, f> + <μ, g>: W_ε (KL form) at convergence
    transport_cost: Optional[Tensor] = None  # [P] float64 <T, C> of the returned plan (with the gradient or plan)
    compute_dtype: torch.dtype = torch.float32
    promoted: bool = False             # float64 for float32 inputs (asked, or float32 cannot resolve the scores)
    precision_bound: float = 0.0       # u·κ: bound on a score's exponent error (docs/DESIGN.md §9, Eq. 30)
    precision_ok: bool = True          # precision_bound ≤ PRECISION_LIMIT (else a warning was issued)


def marginal_errors(plan: Tensor, a_weights: Optional[Tensor] = None,
                    b_weights: Optional[Tensor] = None) -> tuple:
    """(row_err [P], col_err [P]) of a materialised plan [P, I, J], in float64."""
    plan = plan.double()
    P, I, J = plan.shape
    u = log_weights(a_weights, P, I, 'a_weights', torch.float64, plan.device).exp()
    mu = log_weights(b_weights, P, J, 'b_weights', torch.float64, plan.device).exp()
    return (plan.sum(2) - u).abs().sum(1), (plan.sum(1) - mu).abs().sum(1)


def _stopping_rule(num_iters, tol, max_iters, eps_scaling, base_dtype):
    if tol is not None and num_iters is not None:
        raise ValueError('give num_iters (fixed iterations) or tol (tolerance mode), not both')
    if tol is None:
        if eps_scaling is not None:
            raise ValueError('eps_scaling is a tolerance-mode option (give tol): with a fixed '
                             'iteration count the annealing would change what num_iters means')
        n = 60 if num_iters is None else int(num_iters)
        if n < 0:
            raise ValueError(f'num_iters must be >= 0, got {num_iters}')
        return FixedIterations(n)
    tol = float(tol)
    if not tol >= TOL_FLOOR[base_dtype]:
        raise ValueError(f'tol={tol} is below the {base_dtype} marginal-error floor {TOL_FLOOR[base_dtype]:g} '
                         '(L1); it could never be reached')
    if max_iters < 1:
        raise ValueError(f'max_iters must be >= 1, got {max_iters}')
    if eps_scaling is not None and not 0.0 < float(eps_scaling) < 1.0:
        raise ValueError(f'eps_scaling must be in (0, 1), got {eps_scaling}')
    return Tolerance(tol, max_iters)


def sinkhorn(a: Tensor, b: Tensor, epsilon: float, *, num_iters: Optional[int] = None,
             tol: Optional[float] = None, max_iters: int = 5000,
             a_weights: Optional[Tensor] = None, b_weights: Optional[Tensor] = None,
             overrelaxation: Union[str, float, None] = 'auto', return_gradient: bool = False,
             return_plan: bool = False, backend: str = 'auto',
             block_elems: int = DEFAULT_BLOCK_ELEMS, eps_scaling: Optional[float] = None,
             precision: str = 'auto') -> SinkhornResult:
    """Solve P entropic OT problems with cost ½‖a_i − b_j‖² in one call, log domain, streaming.

    Args:
        a: [P, I, D] source clouds (any float dtype; computed in float32, float64 if given float64 or if float32
            cannot resolve the scores, see ``precision``).
        b: [P, J, D] target clouds.
        epsilon: entropic regularisation ε > 0 in units of the cost ½‖a − b‖² (ε here = ½ × an ε applied to
            ‖a − b‖²: the public VDOT code's 0.1 on ‖a − b‖² is 0.05 here).
        num_iters: fixed number of (g, f) iterations (default 60, the VDOT paper setting);
            exclusive with ``tol``.
        tol: tolerance mode: iterate until every problem's column-marginal L1 error ≤ tol
            (rows are exact by construction) or ``max_iters``; must be ≥ TOL_FLOOR[dtype].
        a_weights, b_weights: [P, I] / [P, J] (or 1-D shared) positive weights, normalised;
            default uniform.
        overrelaxation: 'auto' (tolerance mode only: adaptive ω after a plain warm-up, guarded),
            None / 1.0 (plain Sinkhorn), or a fixed ω in [1, 2) used after the warm-up.
        return_gradient: also return the envelope gradient Σ_j T_ij (a_i − b_j) [P, I, D] and ⟨T, C⟩.
        return_plan: also materialise the plan [P, I, J] (memory I·J per problem).
        backend: 'auto' | 'fused_cpu' (one C kernel call per (f, g) iteration, float32 CPU) |
            'sdpa' (CPU flash-attention kernel per half-step) | 'triton' (fused CUDA kernel) |
            'blocked' (baddbmm blocks, any device). With ``precision='auto'``, a float32-only backend asked for a
            problem that needs float64 runs the float64 path of its device instead (``result.backend`` says which;
            the promotion warning says why).
        block_elems: score elements held at once by the blocked backend.
        eps_scaling: tolerance mode only: ε-annealing factor q ∈ (0, 1). Before iterating at ε, one
            (f, g) iteration at each of ε_k = ε_0 q^k > ε, ε_0 = ½ (max‖a'‖ + max‖b'‖)² (the largest
            cost of the centred clouds), warm-starting the potentials (Kosowsky & Yuille 1994;
            Schmitzer 2019; geomloss' ``scaling``). These iterations count in ``iters``.
        precision: 'auto' (float32 unless its exponent-error bound u·κ, κ = ε_0/ε, exceeds
            ``vdot_ext.ot.problem.PRECISION_LIMIT``: then float64, with a warning), 'float32' or 'float64'.
            Either way a bound above the limit (even in float64) warns and sets ``precision_ok=False``.

    Raises:
        ValueError: bad shapes, an empty batch (P = 0) or an empty cloud (I or J = 0), bad options.
        vdot_ext.utils.NonFiniteError: NaN/Inf in ``a`` or ``b`` (a ValueError).
    """
    epsilon = float(epsilon)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f'epsilon must be a finite positive number, got {epsilon}')
    check_overrelaxation(overrelaxation)
    a, b = checked_inputs(a, b)
    stop = _stopping_rule(num_iters, tol, max_iters, eps_scaling, a.dtype)
    chosen = choose_precision(a, b, epsilon, precision)
    if chosen.promoted and precision == 'auto' and backend in ('fused_cpu', 'triton'):
        backend = 'auto'        # float32-only kernels: the float64 path of the same device (warned above)
    with torch.no_grad(), torch.autocast(device_type=a.device.type, enabled=False):
        problem = CentredProblem.build(a, b, chosen.dtype, a_weights, b_weights)
        step = make_step(problem, backend, block_elems)
        P = problem.shape[0]
        relax = make_relaxation(overrelaxation, isinstance(stop, Tolerance), P, problem.dtype, a.device)
        eps = epsilon

        g = torch.zeros_like(problem.half_sq_b)
        annealing = epsilon_schedule(problem.max_cost(), eps, eps_scaling)
        for eps_k in annealing:                        # warm start: one iteration per ε_k > ε
            g = step.iterate(g, eps_k).g_hat
        iters = len(annealing)
        it = step.iterate(g, eps)                      # f = F(g)
        omega = None
        while True:
            col_err = l1_error(it.z, problem.log_mu) if stop.needs_error else None
            if stop.done(iters, col_err):
                if omega is not None and bool((omega != 1).any()):
                    # the last f was relaxed (rows not exact): finish with a plain f half-step, check again
                    it, omega = step.iterate(g, eps), None
                    relax.reset()
                    continue
                break
            omega = relax.omega(col_err)
            g = it.g_hat if omega is None else g + omega * (it.g_hat - g)     # g ← g + ω (G(f) − g)
            it = step.iterate(g, eps, it.f, omega)                            # f ← f + ω (F(g) − f)
            iters += 1
        return _finish(problem, step, it.f, g, it.f_hat, it.z, eps, iters, stop, chosen, return_gradient,
                       return_plan, annealing_iters=len(annealing))


def _finish(problem: CentredProblem, step: SinkhornStep, f: Tensor, g: Tensor, f_hat: Tensor, z: Tensor,
            eps: float, iters: int, stop, chosen, return_gradient: bool, return_plan: bool,
            annealing_iters: int) -> SinkhornResult:
    """True marginal errors, gradient, ⟨T, C⟩ and raw-cost potentials of the plan (f, g)."""
    bary = None
    if return_gradient:
        # one more pass: F(g) again and the barycentre T b' / (T1) (values = b')
        f_hat, bary = step.f_transform(g, eps, values=problem.bc)
    row_log = (f - f_hat) / eps                      # log((T1)_i / u_i), 0 up to rounding after a plain f
    row_err = l1_error(row_log, problem.log_u)
    col_err = l1_error(z, problem.log_mu)
    row_mass = (problem.log_u + row_log.clamp(max=80.0)).exp()        # (T1)_i
    gradient = transport_cost = plan = None
    if return_gradient:
        # envelope gradient g_i = (T1)_i (a'_i + δ) − (T b')_i  (= Σ_j T_ij (a_i − b_j))
        gradient = row_mass.unsqueeze(-1) * (problem.ac + problem.delta - bary)
        transport_cost = _transport_cost(problem, row_mass, z, bary)
    if return_plan:
        cost = 0.5 * torch.cdist(problem.ac, problem.bc).square()
        plan = (problem.log_u[:, :, None] + problem.log_mu[:, None, :]
                + (f[:, :, None] + g[:, None, :] - cost) / eps).exp()
        if transport_cost is None:
            raw_cost = cost + sum(x.unsqueeze(d) for x, d in zip(problem.shifts(), (2, 1)))
            transport_cost = (plan.double() * raw_cost.double()).sum(dim=(1, 2))
    f_raw, g_raw = problem.to_raw(f, g)
    dual = ((problem.log_u.exp() * f_raw).double().sum(1) + (problem.log_mu.exp() * g_raw).double().sum(1))
    return SinkhornResult(f=f_raw, g=g_raw, iters=iters, row_err=row_err, col_err=col_err, epsilon=eps,
                          converged=stop.converged, gradient=gradient, plan=plan, backend=step.name,
                          exact_g_steps=getattr(step, 'exact_g_steps', 0), annealing_iters=annealing_iters,
                          dual_value=dual, transport_cost=transport_cost, compute_dtype=problem.dtype,
                          promoted=chosen.promoted, precision_bound=chosen.bound, precision_ok=chosen.ok)


def _transport_cost(problem: CentredProblem, row_mass: Tensor, z: Tensor, bary: Tensor) -> Tensor:
    """⟨T, C⟩ [P] in float64 from the row masses r = T1, column masses m = μ e^z and the barycentre
    β_i = (T b')_i / r_i, without the plan:
    Σ_ij T_ij ½‖a'_i − b'_j + δ‖² = Σ_i r_i ½‖a'_i‖² + Σ_j m_j ½‖b'_j‖² − Σ_i r_i a'_i·β_i
                                   + δ·(Σ_i r_i a'_i − Σ_j m_j b'_j) + ½‖δ‖² Σ_i r_i."""
    r = row_mass.double()
    m = (problem.log_mu.double() + z.double().clamp(max=80.0)).exp()
    ac, bc, delta = problem.ac.double(), problem.bc.double(), problem.delta.double()
    centred = ((r * problem.half_sq_a.double()).sum(1) + (m * problem.half_sq_b.double()).sum(1)
               - (r.unsqueeze(-1) * ac * bary.double()).sum(dim=(1, 2)))
    moved = ((r.unsqueeze(-1) * ac).sum(1) - (m.unsqueeze(-1) * bc).sum(1)) * delta.squeeze(1)
    return centred + moved.sum(-1) + 0.5 * delta.squeeze(1).square().sum(-1) * r.sum(1)


def envelope_gradient(a: Tensor, b: Tensor, result: SinkhornResult, *,
                      a_weights: Optional[Tensor] = None, b_weights: Optional[Tensor] = None,
                      backend: str = 'auto', block_elems: int = DEFAULT_BLOCK_ELEMS) -> Tensor:
    """∇_{a_i} W_ε = Σ_j T_ij (a_i − b_j) = a_i (T1)_i − (T b)_i for the plan of ``result``.

    One streaming pass (the barycentric projection is an attention product with values b), in the result's
    compute dtype. Same centring as :func:`sinkhorn`: T is invariant to it, a_i − b_j = a'_i − b'_j + δ.
    """
    a, b = checked_inputs(a, b)
    dtype = result.compute_dtype
    eps = result.epsilon
    if dtype == torch.float64 and backend in ('fused_cpu', 'triton'):
        backend = 'auto'
    with torch.no_grad(), torch.autocast(device_type=a.device.type, enabled=False):
        problem = CentredProblem.build(a, b, dtype, a_weights, b_weights)
        step = make_step(problem, 'sdpa' if backend == 'fused_cpu' else backend, block_elems)
        f, g = problem.from_raw(result.f.to(dtype), result.g.to(dtype))
        f_hat, bary = step.f_transform(g, eps, values=problem.bc)
        row_mass = (problem.log_u + ((f - f_hat) / eps).clamp(max=80.0)).exp()
        return row_mass.unsqueeze(-1) * (problem.ac + problem.delta - bary)
