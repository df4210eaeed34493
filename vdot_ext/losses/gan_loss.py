"""Adversarial losses on discriminator logits."""
import torch.nn as nn
import torch.nn.functional as F

from vdot_ext.registry import MODELS


@MODELS.register_module()
class RelativisticGANLoss(nn.Module):
    """Relativistic pairing GAN loss (VDOT paper eq. 11/12; Jolicoeur-Martineau 2019).

    generator:      ``L_G = mean softplus(−(D(x_fake) − D(x_real)))``
    discriminator:  ``L_D = mean softplus(−(D(x_real) − D(x_fake)))``

    Both inputs are noised at the same GAN timestep by the caller. The paper's
    eq. 11/12 write the expectation of −(D_f − D_r); softplus is its smooth,
    bounded-below form used by the relativistic GAN literature (R3GAN).
    """

    def __init__(self, loss_weight: float = 0.1):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, logits_fake, logits_real, target: str):
        """``target`` is 'generator' or 'discriminator'."""
        diff = logits_fake.float() - logits_real.float()
        if target == 'generator':
            loss = F.softplus(-diff).mean()
        elif target == 'discriminator':
            loss = F.softplus(diff).mean()
        else:
            raise ValueError("RelativisticGANLoss target must be 'generator' or "
                             f"'discriminator', got {target!r}")
        return self.loss_weight * loss
