"""Distribution matching distillation loss (DMD; Yin et al. 2024, Self-Forcing form)."""
import torch
import torch.nn as nn

from vdot_ext.registry import MODELS

from .utils import per_sample_mean, raise_nonfinite, surrogate_loss


@MODELS.register_module()
class DMDLoss(nn.Module):
    """Reverse-KL gradient as a regression target (DESIGN.md §5).

    ``grad = x0_fake − x0_real``  (= σ²/(1 − σ) · (s_fake − s_real), see below)
    ``grad ← grad / mean|x − x0_real|``  per sample   (normalize='mean_abs')
    ``grad ← grad · σ``                                (scale_by_sigma=True, public VDOT code)
    ``L = 0.5 · mean((x − sg(x − grad))²)``  so that ∂L/∂x = grad / numel.

    The sign: with x_t = (1 − σ)·x0 + σ·ε the score of a denoiser with x0
    prediction x̂0 is s(x_t) = −(x_t − (1 − σ)·x̂0)/σ², so
    s_fake − s_real = (1 − σ)/σ² · (x0_fake − x0_real). ``grad`` is the reverse-KL
    gradient s_fake − s_real (DMD, Yin et al. 2024, eq. 7) up to a positive factor;
    descending it moves x towards the teacher (real score).

    Non-finite inputs are an error (docs/DESIGN.md §11): the public code's
    ``nan_to_num`` would zero a NaN gradient silently. A NaN/Inf in any input,
    or an overflow, raises :class:`~vdot_ext.utils.NonFiniteError` naming the
    inputs and batch rows, so that the training step skips the batch.

    Args:
        normalize: 'mean_abs' (Self-Forcing / DMD2 normaliser) or 'none'.
        scale_by_sigma: multiply the gradient by σ = t/1000 (needs ``t``).
        loss_weight: multiplies the loss.
    """

    def __init__(self,
                 normalize: str = 'mean_abs',
                 scale_by_sigma: bool = False,
                 loss_weight: float = 1.0):
        super().__init__()
        if normalize not in ('mean_abs', 'none'):
            raise ValueError(f"DMDLoss.normalize must be 'mean_abs' or 'none', "
                             f'got {normalize!r}')
        self.normalize = normalize
        self.scale_by_sigma = scale_by_sigma
        self.loss_weight = loss_weight
        self.last_stats = {}

    @torch.no_grad()
    def dmd_gradient(self, x, pred_fake_x0, pred_real_x0, t=None):
        """The DMD gradient in x0 space (float32, no graph); raises
        ``NonFiniteError`` if it is not finite."""
        x = x.detach().float()
        pred_real_x0 = pred_real_x0.detach().float()
        grad = pred_fake_x0.detach().float() - pred_real_x0
        if self.normalize == 'mean_abs':
            grad = grad / per_sample_mean((x - pred_real_x0).abs()).clamp_min(1e-8)
        if self.scale_by_sigma:
            if t is None:
                raise ValueError('DMDLoss(scale_by_sigma=True) needs the timestep t')
            sigma = torch.as_tensor(t, dtype=torch.float32, device=x.device) / 1000.0
            grad = grad * sigma.reshape(-1, *([1] * (x.ndim - 1)))
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
            # x itself is not finite (normalize='none' does not read it in grad)
            raise_nonfinite('DMDLoss', 'the loss', x=x, pred_fake_x0=pred_fake_x0,
                            pred_real_x0=pred_real_x0, t=t)
        return loss
