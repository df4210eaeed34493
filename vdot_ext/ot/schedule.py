"""The small pieces around the Sinkhorn loop: when to stop, how far to move (over-relaxation), at which ε.

Each is a tiny object with O(P) state and O(P) work per iteration, whatever the iteration count: the driver
(:func:`vdot_ext.ot.sinkhorn.sinkhorn`) asks ``stop.done(iters, err)``, then ``relax.omega(err)``, and runs one
step. No per-iteration history is kept beyond the last ``_RELAX_WINDOW + 1`` errors.
"""
from __future__ import annotations

import collections
from typing import List, Optional

import torch
from torch import Tensor

__all__ = ['epsilon_schedule', 'FixedIterations', 'Tolerance', 'PlainSteps', 'DelayedRelaxation',
           'GuardedRelaxation', 'make_relaxation', 'l1_error']

# Over-relaxation (Thibault et al. 2017 "Overrelaxed Sinkhorn-Knopp"; Lehmann et al. 2021 "A note on
# overrelaxation in the Sinkhorn algorithm"): ω* = 2 / (1 + sqrt(1 − θ)) from the observed contraction θ of plain
# iterations; capped, started only after a plain warm-up (docs/DESIGN.md §9, Eq. 28).
_RELAX_WARMUP = 10
_RELAX_WINDOW = 5
_RELAX_MAX = 1.8
_RELAX_GUARD = 2.0


def l1_error(log_ratio: Tensor, log_w: Tensor) -> Tensor:
    """‖marginal − w‖₁ per problem from z = log(marginal / w): Σ_k w_k |expm1(z_k)| (docs/DESIGN.md §9, Eq. 27).

    z is clamped at 80, so an early, far-off state reports a huge finite error.
    """
    return (log_w.exp() * torch.expm1(log_ratio.clamp(max=80.0)).abs()).sum(dim=1)


def epsilon_schedule(eps_start: float, epsilon: float, factor: Optional[float]) -> List[float]:
    """ε-scaling (Kosowsky & Yuille 1994; Schmitzer 2019; geomloss ``epsilon_schedule``): ε_k = ε₀ q^k > ε, the
    annealing values run before the target ε (docs/DESIGN.md §9, Eq. 29); [] without ε-scaling."""
    if factor is None:
        return []
    out, e = [], float(eps_start)
    while e > epsilon:
        out.append(e)
        e *= float(factor)
    return out


class FixedIterations:
    """Stop after ``n`` (g, f) iterations (the VDOT paper's 60)."""
    needs_error = False
    converged = None

    def __init__(self, n: int):
        self.n = int(n)

    def done(self, iters: int, col_err: Optional[Tensor] = None) -> bool:
        return iters >= self.n


class Tolerance:
    """Stop when every problem's column-marginal L1 error is ≤ tol (rows are exact), or after ``max_iters``."""
    needs_error = True

    def __init__(self, tol: float, max_iters: int):
        self.tol = float(tol)
        self.n = int(max_iters)
        self.converged: Optional[bool] = None

    def done(self, iters: int, col_err: Tensor) -> bool:
        self.converged = bool((col_err <= self.tol).all())
        return self.converged or iters >= self.n


class PlainSteps:
    """ω = 1 throughout (plain Sinkhorn)."""

    def omega(self, col_err: Optional[Tensor]) -> Optional[Tensor]:
        return None

    def reset(self) -> None:
        pass


class DelayedRelaxation:
    """Fixed-iteration mode with a user ω: plain for the warm-up, then ω (no errors are computed, no guard)."""

    def __init__(self, omega: float, P: int, dtype, device):
        self.value = float(omega)
        self.calls = 0
        self.ones = torch.ones(P, 1, dtype=dtype, device=device)

    def omega(self, col_err: Optional[Tensor]) -> Tensor:
        self.calls += 1
        return self.ones * (self.value if self.calls > _RELAX_WARMUP else 1.0)

    def reset(self) -> None:
        pass


class GuardedRelaxation:
    """Guarded adaptive ω per problem (tolerance mode; docs/DESIGN.md §9, Eq. 28).

    - plain (ω = 1) for the first iterations and after every reset;
    - after ``_RELAX_WINDOW`` plain iterations past the warm-up, θ = (e_t / e_{t−w})^{1/w} and
      ω = min(cap, 2 / (1 + sqrt(1 − θ))) (or the user's fixed ω);
    - guard: if the error exceeds twice the best seen while ω > 1, back to ω = 1 and halve the cap's excess
      (re-estimated after another plain window).

    State is O(P): the running best error and a ring of the last ``_RELAX_WINDOW + 1`` errors.
    """

    def __init__(self, fixed: Optional[float], P: int, dtype, device):
        self.fixed = fixed
        self.value = torch.ones(P, 1, dtype=dtype, device=device)
        self.cap = torch.full((P, 1), _RELAX_MAX if fixed is None else fixed, dtype=dtype, device=device)
        self.plain_since = torch.zeros(P, dtype=torch.long, device=device)
        self.best: Optional[Tensor] = None                       # min of all errors before the current one
        self.recent = collections.deque(maxlen=_RELAX_WINDOW + 1)
        self.seen = 0

    def reset(self) -> None:
        """After a plain f step taken to finish (rows exact), start the plain window again."""
        self.value = torch.ones_like(self.value)
        self.plain_since.zero_()

    def omega(self, col_err: Tensor) -> Tensor:
        self.seen += 1
        self.recent.append(col_err)
        omega = self.value
        plain = omega.squeeze(1) == 1
        self.plain_since = torch.where(plain, self.plain_since + 1, torch.zeros_like(self.plain_since))
        if self.best is not None:
            # SOR errors oscillate, so the guard fires on real growth only: above twice the best so far
            grew = (~plain) & (col_err > _RELAX_GUARD * self.best)
            if bool(grew.any()):
                omega = torch.where(grew[:, None], torch.ones_like(omega), omega)
                self.cap[grew] = 1.0 + 0.5 * (self.cap[grew] - 1.0)
                self.plain_since = torch.where(grew, torch.zeros_like(self.plain_since), self.plain_since)
        self.best = col_err if self.best is None else torch.minimum(self.best, col_err)
        if self.seen > _RELAX_WARMUP:
            ready = (omega.squeeze(1) == 1) & (self.plain_since >= _RELAX_WINDOW)
            if bool(ready.any()):
                ratio = (self.recent[-1] / self.recent[0].clamp_min(1e-300)).clamp(0.0, 1.0)
                theta = ratio.pow(1.0 / _RELAX_WINDOW)
                if self.fixed is None:
                    w_opt = 2.0 / (1.0 + torch.sqrt((1.0 - theta).clamp_min(0.0)))
                else:
                    w_opt = torch.full_like(theta, self.fixed)
                w_new = torch.minimum(w_opt[:, None], self.cap)
                # only relax problems that are actually contracting
                use = ready & (ratio < 1.0) & (w_new.squeeze(1) > 1.0)
                omega = torch.where(use[:, None], w_new, omega)
        self.value = omega
        return omega


def make_relaxation(overrelaxation, tolerance_mode: bool, P: int, dtype, device):
    """'auto' → guarded adaptive ω in tolerance mode, plain otherwise; None / 1.0 → plain; ω in (1, 2) → guarded
    with that ω (tolerance mode) or plain warm-up then ω (fixed iterations)."""
    if overrelaxation == 'auto':
        return GuardedRelaxation(None, P, dtype, device) if tolerance_mode else PlainSteps()
    if overrelaxation is None:
        return PlainSteps()
    omega = float(overrelaxation)
    if omega == 1.0:
        return PlainSteps()
    if tolerance_mode:
        return GuardedRelaxation(omega, P, dtype, device)
    return DelayedRelaxation(omega, P, dtype, device)


def check_overrelaxation(overrelaxation) -> None:
    if overrelaxation == 'auto' or overrelaxation is None:
        return
    try:
        omega = float(overrelaxation)
    except (TypeError, ValueError):
        omega = float('nan')
    if not 1.0 <= omega < 2.0:
        raise ValueError(f"overrelaxation must be 'auto', None or a float in [1, 2), got {overrelaxation!r}")
