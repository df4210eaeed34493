"""One Sinkhorn iteration per backend, behind one interface (geomloss' swappable ``softmin``).

For the centred problem (:class:`vdot_ext.ot.problem.CentredProblem`) at ε, with the half-steps of
docs/DESIGN.md §9, Eq. 25 written as attention with a key bias:

    F(g)_i = ½‖a'_i‖² − ε LSE_j(a'_i·b'_j/ε + log μ_j + (g_j − ½‖b'_j‖²)/ε)                (f half-step)
    z_j(f, g) = log((Tᵀ1)_j / μ_j) = (g_j − ½‖b'_j‖²)/ε + LSE_i(b'_j·a'_i/ε + log u_i + (f_i − ½‖a'_i‖²)/ε)
    G(f)_j = g_j − ε z_j(f, g) = ½‖b'_j‖² − ε LSE_i(…)                                     (g half-step)

``z`` is the column log-marginal of the plan (f, g) itself, one log-sum-exp over its columns: the true column
error comes from it directly, never from the difference of two rounded potentials (which reads 0 once the
potentials stop moving in their dtype, however wrong the plan).

A step's :meth:`SinkhornStep.iterate` does f = F(g) (over-relaxed: f_old + ω (F(g) − f_old)), then G(f) and z.
Backends: ``sdpa``, ``blocked``, ``triton`` (one streaming softmin per half-step, :mod:`vdot_ext.ot.streaming`) and
``fused_cpu`` (one C call per iteration, :mod:`vdot_ext.ot.cpu_kernel`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .cpu_kernel import MIN_COLUMN_MASS
from .problem import CentredProblem
from .streaming import DEFAULT_BLOCK_ELEMS, resolve_backend, softmin_function

__all__ = ['Iterate', 'SinkhornStep', 'StreamingStep', 'FusedCPUStep', 'make_step']


class Iterate(NamedTuple):
    f: Tensor        # [P, I] the new f (over-relaxed if ω was given)
    f_hat: Tensor    # [P, I] F(g), the plain f half-step
    g_hat: Tensor    # [P, J] G(f), the plain g half-step from the new f
    z: Tensor        # [P, J] log((Tᵀ1)_j / μ_j) of the plan (f, g)


class SinkhornStep:
    """Interface: the half-steps of one backend for one centred problem."""
    name = ''

    def __init__(self, problem: CentredProblem, softmin):
        self.problem = problem
        self.softmin = softmin      # fn(x, y, bias, ε, values=None) → (lse, out)

    def f_transform(self, g: Tensor, eps: float, values: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """F(g) and, with ``values`` [P, J, D], the row-normalised barycentre Σ_j softmax_j(…) values_j."""
        p = self.problem
        lse, out = self.softmin(p.ac, p.bc, p.log_mu + (g - p.half_sq_b) / eps, eps, values)
        return p.half_sq_a - eps * lse, out

    def g_transform(self, f: Tensor, g: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
        """(G(f), z(f, g))."""
        p = self.problem
        lse, _ = self.softmin(p.bc, p.ac, p.log_u + (f - p.half_sq_a) / eps, eps, None)
        return p.half_sq_b - eps * lse, (g - p.half_sq_b) / eps + lse

    def iterate(self, g: Tensor, eps: float, f_old: Optional[Tensor] = None,
                omega: Optional[Tensor] = None) -> Iterate:
        f_hat, _ = self.f_transform(g, eps)
        f = f_hat if omega is None else f_old + omega * (f_hat - f_old)
        g_hat, z = self.g_transform(f, g, eps)
        return Iterate(f, f_hat, g_hat, z)


class StreamingStep(SinkhornStep):
    """Two streaming softmin passes per iteration: 'sdpa' (CPU flash attention), 'blocked', 'triton'."""

    def __init__(self, problem: CentredProblem, backend: str, block_elems: int = DEFAULT_BLOCK_ELEMS):
        super().__init__(problem, softmin_function(backend, block_elems))
        self.name = backend


class FusedCPUStep(SinkhornStep):
    """One C call per (f, g) iteration (``csrc/sinkhorn_cpu.c``, docs/DESIGN.md §9, Eq. 31): the row LSE gives
    F(g); the column masses M_j of the plan with the new f give z_j = log M_j − log μ_j and G(f) = g − ε z.

    Columns whose mass underflows (or is not finite) are redone exactly in the log domain; ``exact_g_steps``
    counts those iterations. Single passes (the envelope gradient) run on 'sdpa'.
    """
    name = 'fused_cpu'

    def __init__(self, problem: CentredProblem):
        super().__init__(problem, softmin_function('sdpa'))
        from .cpu_kernel import FusedCPUIteration
        self.kernel = FusedCPUIteration(problem.ac, problem.bc, problem.log_u)
        self.exact_g_steps = 0

    def iterate(self, g: Tensor, eps: float, f_old: Optional[Tensor] = None,
                omega: Optional[Tensor] = None) -> Iterate:
        p = self.problem
        h = p.log_mu + (g - p.half_sq_b) / eps
        q = None if omega is None else (f_old - p.half_sq_a) / eps
        lse, mass = self.kernel(h, eps, q, omega)
        f_hat = p.half_sq_a - eps * lse
        f = f_hat if omega is None else f_old + omega * (f_hat - f_old)
        if not bool((torch.isfinite(mass) & (mass >= MIN_COLUMN_MASS)).all()):
            self.exact_g_steps += 1
            g_hat, z = self.g_transform(f, g, eps)
            return Iterate(f, f_hat, g_hat, z)
        z = mass.log() - p.log_mu.double()                                  # float64
        return Iterate(f, f_hat, (g.double() - eps * z).to(p.dtype), z.to(p.dtype))


def make_step(problem: CentredProblem, backend: str = 'auto', block_elems: int = DEFAULT_BLOCK_ELEMS
              ) -> SinkhornStep:
    """The step for ``backend`` ('auto' resolved for the problem's device and dtype)."""
    name = resolve_backend(backend, problem.ac.device, problem.dtype)
    if name == 'fused_cpu':
        return FusedCPUStep(problem)
    return StreamingStep(problem, name, block_elems)
