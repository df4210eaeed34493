"""The centred OT problem, built once: checked clouds, log-weights, centring, and the compute precision.

Centring (docs/DESIGN.md §9, Eq. 26). The plan does not change when separable terms are added to the cost, so
with a' = a − ā, b' = b − b̄, δ = ā − b̄:

    ½‖a_i − b_j‖² = ½‖a'_i − b'_j‖² + s_i + t_j,      s_i = a'_i·δ + ½‖δ‖²,   t_j = −b'_j·δ

The solver runs on (a', b'); the potentials of the original cost are f + s, g + t.

Precision (docs/DESIGN.md §9, Eq. 30). Every score a'_i·b'_j/ε + h_j of a half-step is a number of size up to
κ = ε₀/ε, ε₀ = ½ (max‖a'‖ + max‖b'‖)² (the largest centred cost), and the plan needs it to an absolute accuracy
well below 1 (it sits in an exponent). A dtype with unit roundoff u gives an exponent error of about u·κ, whatever
the potentials are stored in: the Gram product a'·b' itself is rounded (float32 at inputs of size 1e3 and ε = 0.1:
|a'·b' error|/ε ≈ 17). Rescaling the clouds does not help either, since only C/ε enters the plan. So the solver
computes in float64 when float32's bound u₃₂·κ exceeds ``PRECISION_LIMIT`` and warns (and flags the result) when
even float64's does. Measured (``benchmarks/check_sinkhorn_accuracy.py``): the gradient error is 0.02–0.15 × u·κ.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from vdot_ext.utils import NonFiniteError

__all__ = ['CentredProblem', 'Precision', 'check_clouds', 'checked_inputs', 'choose_precision', 'log_weights',
           'PRECISION_LIMIT', 'UNIT_ROUNDOFF']

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}

# Largest accepted bound u·κ on the exponent error of a score: gradients stay within ~1e-3 of the float64
# reference below it (measured by benchmarks/check_sinkhorn_accuracy.py: 0.02–0.15 × u·κ); float32 → float64 at
# κ ≈ 1.7e5 (the VDOT setting, unit-variance 16-channel latents at ε = 0.05, has κ ≈ 2e3), float64 flagged at κ ≈ 9e13.
PRECISION_LIMIT = 0.01


def check_clouds(a: Tensor, b: Tensor) -> None:
    """Shapes [P, I, D] / [P, J, D], one device, nothing empty (each error names the argument)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f'a and b must be tensors, got {type(a).__name__} and {type(b).__name__}')
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f'a must be [P, I, D] and b [P, J, D] with the same P and D; '
                         f'got {tuple(a.shape)} and {tuple(b.shape)}')
    if a.device != b.device:
        raise ValueError(f'a and b must be on one device, got {a.device} and {b.device}')
    if a.shape[0] == 0:
        raise ValueError(f'a and b hold an empty batch (P = 0 problems): shapes {tuple(a.shape)} and '
                         f'{tuple(b.shape)}')
    for name, x in (('a', a), ('b', b)):
        if x.shape[1] == 0:
            raise ValueError(f'{name} is an empty cloud (0 points) in every problem: shape {tuple(x.shape)}; '
                             'balanced OT needs at least one point per side')
    if a.shape[2] == 0:
        raise ValueError(f'a and b have no features (D = 0): shapes {tuple(a.shape)} and {tuple(b.shape)}')
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f'a and b must be floating point, got {a.dtype} and {b.dtype}')


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise NonFiniteError(f'sinkhorn: {name} must be finite, got NaN/Inf in problem(s) {bad[:8]}'
                             f'{" ..." if len(bad) > 8 else ""} (shape {tuple(x.shape)})')


def checked_inputs(a: Tensor, b: Tensor):
    """(a, b) detached, in the base dtype (float32, float64 if either is float64), checked finite."""
    check_clouds(a, b)
    base = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a = a.detach().to(base)
    b = b.detach().to(base)
    _check_finite(a, 'a')
    _check_finite(b, 'b')
    return a, b


def log_weights(w: Optional[Tensor], P: int, N: int, name: str, dtype, device) -> Tensor:
    """log of the normalised weights [P, N] (uniform 1/N when ``w`` is None; 1-D ``w`` is shared)."""
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


@dataclass
class Precision:
    """The compute dtype chosen for a problem and why (docs/DESIGN.md §9, Eq. 30)."""
    dtype: torch.dtype          # what the half-steps compute in
    base: torch.dtype           # float32, or float64 for float64 inputs
    kappa: float                # ε₀/ε: the largest score magnitude
    bound: float                # u(dtype)·κ: bound on the exponent error of a score
    promoted: bool              # float64 for float32 inputs ('auto': float32's bound exceeds PRECISION_LIMIT)

    @property
    def ok(self) -> bool:
        return self.bound <= PRECISION_LIMIT


def max_centred_cost(a: Tensor, b: Tensor) -> float:
    """ε₀ = ½ (max‖a'‖ + max‖b'‖)², an upper bound of every centred cost ½‖a'_i − b'_j‖²."""
    ra = (a - a.mean(dim=1, keepdim=True)).norm(dim=-1).amax()
    rb = (b - b.mean(dim=1, keepdim=True)).norm(dim=-1).amax()
    return 0.5 * float(ra + rb) ** 2


def choose_precision(a: Tensor, b: Tensor, epsilon: float, precision: str = 'auto') -> Precision:
    """'auto': float32 (float64 for float64 inputs) unless float32 cannot resolve the scores, then float64 with a
    warning; 'float32' / 'float64': as asked, with a warning if the bound exceeds ``PRECISION_LIMIT``."""
    if precision not in ('auto', 'float32', 'float64'):
        raise ValueError(f"precision must be 'auto', 'float32' or 'float64', got {precision!r}")
    base = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    with torch.no_grad():
        kappa = max_centred_cost(a.detach().to(base), b.detach().to(base)) / epsilon
    if not math.isfinite(kappa):
        raise ValueError(f'sinkhorn: the clouds are too large to represent their costs (max centred cost / ε = '
                         f'{kappa}); normalise the inputs')
    if precision == 'auto':
        dtype = base
        if base == torch.float32 and UNIT_ROUNDOFF[torch.float32] * kappa > PRECISION_LIMIT:
            dtype = torch.float64
    else:
        dtype = torch.float32 if precision == 'float32' else torch.float64
    chosen = Precision(dtype=dtype, base=base, kappa=kappa, bound=UNIT_ROUNDOFF[dtype] * kappa,
                       promoted=dtype == torch.float64 and base == torch.float32)
    if chosen.promoted and precision == 'auto':
        warnings.warn(
            f'vdot_ext.ot.sinkhorn: the scores reach κ = max centred cost / ε ≈ {kappa:.0e}, beyond float32 '
            f'(exponent error bound {UNIT_ROUNDOFF[torch.float32] * kappa:.1e} > {PRECISION_LIMIT}); solving in '
            "float64 (slower; the float32-only backends 'fused_cpu' / 'triton' give way to 'sdpa' / 'blocked'). "
            'Inputs this large usually mean unnormalised or diverging latents (docs/DESIGN.md §9).',
            RuntimeWarning, stacklevel=3)
    if not chosen.ok:
        warnings.warn(
            f'vdot_ext.ot.sinkhorn: {str(dtype).replace("torch.", "")} cannot resolve this problem: κ = max centred '
            f'cost / ε ≈ {kappa:.0e}, exponent error bound {chosen.bound:.1e} > {PRECISION_LIMIT}; the plan and '
            'gradient are approximate '
            '(result.precision_ok is False). Raise ε or normalise the inputs (docs/DESIGN.md §9).',
            RuntimeWarning, stacklevel=3)
    return chosen


@dataclass
class CentredProblem:
    """P problems on centred clouds in one dtype: everything the half-steps and the gradient need."""
    ac: Tensor          # [P, I, D] a' = a − ā
    bc: Tensor          # [P, J, D] b' = b − b̄
    delta: Tensor       # [P, 1, D] δ = ā − b̄
    half_sq_a: Tensor   # [P, I] ½‖a'_i‖²
    half_sq_b: Tensor   # [P, J] ½‖b'_j‖²
    log_u: Tensor       # [P, I] log source weights
    log_mu: Tensor      # [P, J] log target weights

    @classmethod
    def build(cls, a: Tensor, b: Tensor, dtype: torch.dtype, a_weights: Optional[Tensor] = None,
              b_weights: Optional[Tensor] = None) -> 'CentredProblem':
        """From inputs that passed :func:`checked_inputs`."""
        P, I, _ = a.shape
        J = b.shape[1]
        a = a.detach().to(dtype)
        b = b.detach().to(dtype)
        log_u = log_weights(a_weights, P, I, 'a_weights', dtype, a.device)
        log_mu = log_weights(b_weights, P, J, 'b_weights', dtype, a.device)
        a_mean = a.mean(dim=1, keepdim=True)
        b_mean = b.mean(dim=1, keepdim=True)
        ac = (a - a_mean).contiguous()
        bc = (b - b_mean).contiguous()
        return cls(ac=ac, bc=bc, delta=a_mean - b_mean, half_sq_a=0.5 * ac.square().sum(-1),
                   half_sq_b=0.5 * bc.square().sum(-1), log_u=log_u, log_mu=log_mu)

    @property
    def dtype(self) -> torch.dtype:
        return self.ac.dtype

    @property
    def shape(self):
        """(P, I, J, D)."""
        P, I, D = self.ac.shape
        return P, I, self.bc.shape[1], D

    def shifts(self):
        """(s [P, I], t [P, J]) of Eq. 26: raw-cost potentials are (f + s, g + t)."""
        s = (self.ac * self.delta).sum(-1) + 0.5 * self.delta.square().sum(-1)
        t = -(self.bc * self.delta).sum(-1)
        return s, t

    def to_raw(self, f: Tensor, g: Tensor):
        s, t = self.shifts()
        return f + s, g + t

    def from_raw(self, f: Tensor, g: Tensor):
        s, t = self.shifts()
        return f - s, g - t

    def max_cost(self) -> float:
        """ε₀ = ½ (max‖a'‖ + max‖b'‖)² (ε-scaling's start, Eq. 29)."""
        return 0.5 * float(self.ac.norm(dim=-1).amax() + self.bc.norm(dim=-1).amax()) ** 2
