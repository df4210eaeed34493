"""Flow-matching denoising loss for the fake score (critic)."""
import torch
import torch.nn as nn

from vdot_ext.registry import MODELS

from .utils import raise_nonfinite


@MODELS.register_module()
class DenoisingLoss(nn.Module):
    """``L = mean((v_pred − (ε − x0))²)`` on generator samples (DESIGN.md §5).

    The velocity target of rectified flow (Wan2.1): x_t = (1−σ)x0 + σε, v = ε − x0.
    A non-finite loss raises :class:`~vdot_ext.utils.NonFiniteError` naming the
    inputs and batch rows that hold NaN/Inf (docs/DESIGN.md §11).
    """

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, v_pred, x0, noise):
        target = noise.float() - x0.float()
        loss = self.loss_weight * (v_pred.float() - target).square().mean()
        if not bool(torch.isfinite(loss)):
            raise_nonfinite('DenoisingLoss', 'the loss', v_pred=v_pred, x0=x0, noise=noise)
        return loss
