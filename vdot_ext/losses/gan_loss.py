"""Adversarial losses on discriminator logits."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from vdot_ext.registry import MODELS

from .utils import raise_nonfinite


@MODELS.register_module()
class RelativisticGANLoss(nn.Module):
    """Relativistic pairing GAN loss (VDOT paper eq. 11/12; Jolicoeur-Martineau 2019).

    generator:      ``L_G = mean softplus(−(D(x_fake) − D(x_real)))``
    discriminator:  ``L_D = mean softplus(−(D(x_real) − D(x_fake)))``

    Both inputs are noised at the same GAN timestep by the caller. The paper's
    eq. 11/12 write the expectation of −(D_f − D_r); softplus is its smooth,
    bounded-below form used by the relativistic GAN literature (R3GAN).

    Non-finite logits raise :class:`~vdot_ext.utils.NonFiniteError` (docs/DESIGN.md
    §11): softplus maps an infinite difference to a finite loss (0 or ∞ one-sided)
    and would hide a broken discriminator or a NaN sample.
    """

    def __init__(self, loss_weight: float = 0.1):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, logits_fake, logits_real, target: str):
        """``target`` is 'generator' or 'discriminator'."""
        diff = logits_fake.float() - logits_real.float()
        if not bool(torch.isfinite(diff).all()):
            raise_nonfinite('RelativisticGANLoss', f'the {target} loss input (D_fake − D_real)',
                            logits_fake=logits_fake, logits_real=logits_real)
        if target == 'generator':
            loss = F.softplus(-diff).mean()
        elif target == 'discriminator':
            loss = F.softplus(diff).mean()
        else:
            raise ValueError("RelativisticGANLoss target must be 'generator' or "
                             f"'discriminator', got {target!r}")
        return self.loss_weight * loss
