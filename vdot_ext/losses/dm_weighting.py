"""How the generator's distribution-matching terms (OTD, DMD) are weighted and measured (docs/DESIGN.md §5).

The VDOT distiller (:class:`vdot_ext.models.VDOTDistiller`) and the exact-score toy benchmark
(``benchmarks/toy``) both call :func:`distribution_matching_gradients`, so the benchmark measures the code that
trains. Each term is evaluated at a detached copy x of the generator sample; the gradient g = ∂L/∂x it puts on x is
returned, so that its size, its share of the update and the cosine between terms (:func:`gradient_stats`) can be
logged, and the caller back-propagates ⟨x̂0, sg(g)⟩ into the generator.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn

from vdot_ext.utils import NonFiniteError

from .dmd_loss import normalize_displacement

__all__ = ['DM_WEIGHTINGS', 'check_finite_gradient', 'distribution_matching_gradients', 'gradient_stats']

DM_WEIGHTINGS = ('parity', 'balanced')


def check_finite_gradient(term: str, grad: torch.Tensor, owner: str = 'VDOTDistiller') -> None:
    """Raise :class:`~vdot_ext.utils.NonFiniteError` naming the batch rows when ``grad`` (a term's gradient on
    the generator sample) holds NaN/Inf (docs/DESIGN.md §11)."""
    if not bool(torch.isfinite(grad).all()):
        rows = (~torch.isfinite(grad)).reshape(grad.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise NonFiniteError(f'{owner}: the {term} gradient on the generator sample is not finite in '
                             f'batch rows {rows}')


def distribution_matching_gradients(x: torch.Tensor, pred_fake_x0: torch.Tensor, pred_real_x0: torch.Tensor,
                                    t: torch.Tensor, otd_loss: Optional[nn.Module],
                                    dmd_loss: Optional[nn.Module], weights: Dict[str, float],
                                    weighting: str = 'parity', ot_debias: bool = True):
    """The weighted OTD and DMD terms and the gradient each puts on the generator sample x (docs/DESIGN.md §5).

    Args:
        x: the generator sample, a leaf that requires grad (float32).
        pred_fake_x0, pred_real_x0: the fake score's and the teacher's x0 at the same noisy sample of x.
        t: the timestep of that sample, per batch element.
        otd_loss, dmd_loss: the loss modules (None = off).
        weights: ``{'otd': w_otd, 'dmd': w_dmd}``.
        weighting: 'parity' or 'balanced' (below).
        ot_debias: balanced only: subtract the OT displacement of the fake cloud onto itself.

    ``parity`` (the public VDOT code, ``training/model/bi_dmd_gan.py`` ``generator_loss``:
    ``0.2 * dmd_loss + 0.8 * otg_loss``): each loss with its native scale,

        g_OT  = w_otd·λ_otd·c·ĝ          (OTD's normalised step, sum reduction, docs/DESIGN.md Eq. 15)
        g_DMD = w_dmd·λ_dmd·N(D_DMD)/n    (DMD's step, mean reduction, Eq. 11)

    ``balanced``: both terms are displacements in latent units, put through DMD's normaliser N and the same
    mean reduction, so w_otd and w_dmd weigh commensurable steps and the OT step vanishes as the two clouds meet:

        D_DMD = x0_fake − x0_real
        D_OT  = H·W·(∇_a W_ε(a, b) − ∇_a W_ε(a, a))    (per pixel: a_i − b̄_i − (a_i − ā_i), b̄_i = Σ_j T_ij b_j/(T1)_i)
        g_i   = w_i·λ_i·N(D_i)/n,   n = numel(x)

    H·W·∇_a W_ε (uniform token masses 1/I, I = HW/k², pooling adjoint 1/k²) is the barycentric displacement
    a_i − b̄_i of each token towards its transport targets. Its entropic bias (a cloud moved towards its own
    ε-smoothed copy even when fake = real) is removed by the second term (the Sinkhorn divergence's gradient,
    Feydy et al. 2019), so D_OT = 0 exactly when fake = real. N is ``dmd_loss``'s normaliser (mean|x − x0_real|
    per sample by default; the same 'mean_abs' when DMD is off). Balanced needs ``otd_loss.normalize='none'``
    (the raw envelope gradient); OTD's ``grad_scale`` is the parity step size and is not used.

    Returns:
        ``(values, grads, stats)``: ``values[name]`` the term's (surrogate) value, ``grads[name]`` = ∂value/∂x,
        ``stats`` floats (the losses' ``last_stats``; balanced adds 'otd_displacement_norm').

    Raises:
        NonFiniteError: from the losses, or when a gradient on x is not finite.
    """
    values, grads, stats = {}, {}, {}
    numel = x.numel()
    if weighting == 'parity':
        for name, loss in (('otd', otd_loss), ('dmd', dmd_loss)):
            if loss is None:
                continue
            args = (x, pred_fake_x0, pred_real_x0) + ((t, ) if name == 'dmd' else ())
            value = weights[name] * loss(*args)
            stats.update(loss.last_stats)
            (grad, ) = torch.autograd.grad(value, x)
            values[name], grads[name] = value, grad
    elif weighting == 'balanced':
        if dmd_loss is not None:
            normalize = dmd_loss.normalize_displacement
        else:
            def normalize(d, x_, real, t_):
                return normalize_displacement(d, x_, real, t_, 'mean_abs', owner='VDOTDistiller(balanced)')
        if otd_loss is not None:
            hw = x.shape[-2] * x.shape[-1]
            with torch.no_grad():
                own = otd_loss.ot_gradient(pred_fake_x0, pred_fake_x0) if ot_debias else 0.0
                displacement = hw * (otd_loss.ot_gradient(pred_fake_x0, pred_real_x0) - own)
            otd_stats = dict(otd_loss.last_stats)
            otd_stats.pop('otd_step_norm', None)   # parity's c·‖ĝ‖: not what balanced applies
            otd_stats['otd_displacement_norm'] = float(displacement.norm())
            stats.update(otd_stats)
            step = normalize(displacement, x, pred_real_x0, t)
            scale = weights['otd'] * float(getattr(otd_loss, 'loss_weight', 1.0))
            grads['otd'] = scale * step / numel
            values['otd'] = scale * 0.5 * step.square().mean()
        if dmd_loss is not None:
            step = dmd_loss.dmd_gradient(x, pred_fake_x0, pred_real_x0, t)      # N(x0_fake − x0_real)
            stats.update(dmd_loss.last_stats)
            scale = weights['dmd'] * float(dmd_loss.loss_weight)
            grads['dmd'] = scale * step / numel
            values['dmd'] = scale * 0.5 * step.square().mean()
    else:
        raise ValueError(f'unknown dm_weighting {weighting!r}; expected one of {DM_WEIGHTINGS}')
    for name, grad in grads.items():
        check_finite_gradient(name.upper(), grad)
    return values, grads, stats


def gradient_stats(grads: Dict[str, torch.Tensor], prefix: str = 'gen_x') -> Dict[str, float]:
    """‖g_i‖, each term's share ‖g_i‖ / Σ_j ‖g_j‖ and, for two terms, their cosine (docs/DESIGN.md §5).

    Keys: ``<prefix>_grad_norm_<name>``, ``<prefix>_share_<name>`` (with two or more terms) and
    ``<prefix>_cos_<a>_<b>`` (with exactly two)."""
    norms = {name: float(g.float().norm()) for name, g in grads.items()}
    stats = {f'{prefix}_grad_norm_{name}': value for name, value in norms.items()}
    if len(grads) >= 2:
        total = sum(norms.values())
        for name, value in norms.items():
            stats[f'{prefix}_share_{name}'] = value / total if total > 0 else 0.0
    if len(grads) == 2:
        (a, ga), (b, gb) = grads.items()
        denom = norms[a] * norms[b]
        dot = float((ga.double().flatten() * gb.double().flatten()).sum())
        stats[f'{prefix}_cos_{a}_{b}'] = dot / denom if denom > 0 else 0.0
    return stats
