"""Distribution matching distillation loss (DMD; Yin et al. 2024, Self-Forcing form)."""
from typing import Optional

import torch
import torch.nn as nn

from vdot_ext.registry import MODELS

from .utils import per_sample_mean, raise_nonfinite, surrogate_loss

NORMALIZERS = ('mean_abs', 'sigma', 'none')


def normalize_displacement(displacement: torch.Tensor, x: torch.Tensor, pred_real_x0: torch.Tensor,
                           t: Optional[torch.Tensor], normalize: str, scale_by_sigma: bool = False,
                           owner: str = 'DMDLoss') -> torch.Tensor:
    """DMD's normaliser applied to a displacement D in x0 space (float32, per sample; docs/DESIGN.md §5, Eq. 11).

    * ``'mean_abs'``: D / mean|x − x0_real| (DMD2; Self-Forcing ``model/dmd.py`` ``_compute_kl_grad``);
    * ``'sigma'``:    D · σ, σ = t/1000 (the public VDOT stage-2 code, ``training/model/bi_dmd_gan.py``
      ``_compute_kl_grad``: ``grad * (timestep / 1000)``);
    * ``'none'``:     D.

    ``scale_by_sigma`` multiplies by σ after the normaliser (e.g. 'mean_abs' and σ together). The distiller's
    balanced weighting puts the OT displacement through the same normaliser (docs/DESIGN.md §5).
    """
    if normalize not in NORMALIZERS:
        raise ValueError(f'{owner}.normalize must be one of {NORMALIZERS}, got {normalize!r}')
    out = displacement.float()
    if normalize == 'mean_abs':
        x = x.detach().float()
        out = out / per_sample_mean((x - pred_real_x0.detach().float()).abs()).clamp_min(1e-8)
    if normalize == 'sigma' or scale_by_sigma:
        if t is None:
            raise ValueError(f"{owner}(normalize='sigma' or scale_by_sigma=True) needs the timestep t")
        sigma = torch.as_tensor(t, dtype=torch.float32, device=out.device) / 1000.0
        out = out * sigma.reshape(-1, *([1] * (out.ndim - 1)))
    return out


@MODELS.register_module()
class DMDLoss(nn.Module):
    """Reverse-KL gradient as a regression target (docs/DESIGN.md §5, Eq. 11).

    ``grad = x0_fake − x0_real``  (= σ²/(1 − σ) · (s_fake − s_real), see below)
    ``grad ← grad / mean|x − x0_real|``  per sample   (normalize='mean_abs', DMD2 / Self-Forcing)
    ``grad ← grad · σ``                                (normalize='sigma', the public VDOT stage-2 code)
    ``L = 0.5 · mean((x − sg(x − grad))²)``  so that ∂L/∂x = grad / numel.

    The sign: with x_t = (1 − σ)·x0 + σ·ε the score of a denoiser with x0
    prediction x̂0 is s(x_t) = −(x_t − (1 − σ)·x̂0)/σ², so
    s_fake − s_real = (1 − σ)/σ² · (x0_fake − x0_real). The generator descends ``grad``, which is the
    reverse-KL gradient s_fake − s_real (DMD, Yin et al. 2024, eq. 7) up to a positive factor, so x moves
    towards the teacher (real score).

    Non-finite values are an error (docs/DESIGN.md §11): the public code's
    ``nan_to_num`` would zero a NaN gradient silently. A NaN/Inf in any input,
    or an overflow, raises :class:`~vdot_ext.utils.NonFiniteError` naming the
    inputs and batch rows, so that the training step skips the batch.

    Args:
        normalize: 'mean_abs' (DMD2 / Self-Forcing, stage 1 of the public code), 'sigma' (× σ = t/1000, stage 2
            of the public code: ``training/model/bi_dmd_gan.py`` ``_compute_kl_grad``) or 'none'.
        scale_by_sigma: also multiply by σ after the normaliser (needs ``t``).
        loss_weight: multiplies the loss.

    The value is a surrogate, ½·loss_weight·mean(grad²); ``last_stats['dmd_grad_norm']`` = ‖grad‖₂.
    """

    def __init__(self,
                 normalize: str = 'mean_abs',
                 scale_by_sigma: bool = False,
                 loss_weight: float = 1.0):
        super().__init__()
        if normalize not in NORMALIZERS:
            raise ValueError(f'DMDLoss.normalize must be one of {NORMALIZERS}, got {normalize!r}')
        self.normalize = normalize
        self.scale_by_sigma = scale_by_sigma
        self.loss_weight = loss_weight
        self.last_stats = {}

    def extra_repr(self) -> str:
        return f'normalize={self.normalize!r}, scale_by_sigma={self.scale_by_sigma}, loss_weight={self.loss_weight}'

    def normalize_displacement(self, displacement, x, pred_real_x0, t=None):
        """This loss's normaliser applied to a displacement in x0 space (see :func:`normalize_displacement`)."""
        return normalize_displacement(displacement, x, pred_real_x0, t, self.normalize, self.scale_by_sigma)

    @torch.no_grad()
    def dmd_gradient(self, x, pred_fake_x0, pred_real_x0, t=None):
        """The DMD gradient in x0 space (float32, no graph); raises
        ``NonFiniteError`` if it is not finite."""
        grad = self.normalize_displacement(pred_fake_x0.detach().float() - pred_real_x0.detach().float(),
                                           x, pred_real_x0, t)
        norm = grad.norm()
        if not bool(torch.isfinite(norm)):
            raise_nonfinite('DMDLoss', 'the DMD gradient', x=x, pred_fake_x0=pred_fake_x0,
                            pred_real_x0=pred_real_x0, t=t)
        self.last_stats = {'dmd_grad_norm': float(norm)}
        return grad

    def forward(self, x, pred_fake_x0, pred_real_x0, t=None):
        grad = self.dmd_gradient(x, pred_fake_x0, pred_real_x0, t)
        loss = self.loss_weight * surrogate_loss(x, grad, reduction='mean')
        if not bool(torch.isfinite(loss)):
            # x itself is not finite (normalize='none'/'sigma' do not read it in grad)
            raise_nonfinite('DMDLoss', 'the loss', x=x, pred_fake_x0=pred_fake_x0,
                            pred_real_x0=pred_real_x0, t=t)
        return loss
