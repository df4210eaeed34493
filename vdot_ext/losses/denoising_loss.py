"""Flow-matching denoising loss for the fake score (critic)."""
import torch.nn as nn

from vdot_ext.registry import MODELS


@MODELS.register_module()
class DenoisingLoss(nn.Module):
    """``L = mean((v_pred − (ε − x0))²)`` on generator samples (DESIGN.md §5).

    The velocity target of rectified flow (Wan2.1): x_t = (1−σ)x0 + σε, v = ε − x0.
    """

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, v_pred, x0, noise):
        target = noise.float() - x0.float()
        return self.loss_weight * (v_pred.float() - target).square().mean()
