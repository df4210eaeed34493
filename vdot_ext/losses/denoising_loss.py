"""Flow-matching denoising loss for the fake score (critic)."""
from typing import Optional

import torch
import torch.nn as nn

from vdot_ext.registry import MODELS

from .utils import raise_nonfinite

TARGETS = ('velocity', 'x0')


@MODELS.register_module()
class DenoisingLoss(nn.Module):
    """The fake score's denoising loss on generator samples (docs/DESIGN.md §5, Eq. 17).

    ``target='velocity'`` (default; the public VDOT code, ``denoising_loss_type: flow``, ``FlowPredLoss`` in
    ``training/utils/loss.py``; the loss the score was pretrained with):
        ``L = mean((v_pred − (ε − x0))²)``, the rectified-flow target of Wan2.1: x_t = (1−σ)x0 + σε, v = ε − x0.
    ``target='x0'`` (the VDOT paper, Eq. 13):
        ``L = mean((x0_pred − x0)²) = mean(σ²·(v_pred − v)²)``, since x0_pred = x_t − σ·v_pred; needs ``t``.

    A non-finite loss raises :class:`~vdot_ext.utils.NonFiniteError` naming the
    inputs and batch rows that hold NaN/Inf (docs/DESIGN.md §11).
    """

    def __init__(self, loss_weight: float = 1.0, target: str = 'velocity'):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f'DenoisingLoss.target must be one of {TARGETS}, got {target!r}')
        self.loss_weight = loss_weight
        self.target = target

    def extra_repr(self) -> str:
        return f'target={self.target!r}, loss_weight={self.loss_weight}'

    def forward(self, v_pred, x0, noise, t: Optional[torch.Tensor] = None):
        """``v_pred``: the fake score's velocity at x_t; ``x0``, ``noise``: what x_t was made of; ``t``: the
        timestep per sample (needed by ``target='x0'``)."""
        error = v_pred.float() - (noise.float() - x0.float())
        if self.target == 'x0':
            if t is None:
                raise ValueError("DenoisingLoss(target='x0') needs the timestep t")
            sigma = torch.as_tensor(t, dtype=torch.float32, device=error.device) / 1000.0
            error = error * sigma.reshape(-1, *([1] * (error.ndim - 1)))   # x0_pred − x0 = −σ·(v_pred − v)
        loss = self.loss_weight * error.square().mean()
        if not bool(torch.isfinite(loss)):
            raise_nonfinite('DenoisingLoss', 'the loss', v_pred=v_pred, x0=x0, noise=noise, t=t)
        return loss
