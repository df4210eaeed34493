"""Logistic (non-saturating) GAN loss with MoGAN's approximate R1/R2 (docs/DESIGN.md §5, Eq. 19–20).

MoGAN §4.1, eqs. 4–8, with ``g(x) = log(1 + eˣ) = softplus(x)``::

    generator      L_G  = E[ g(−D(o_gen)) ]                               (eq. 5)
    discriminator  L_D  = E[ g(−D(o_real)) + g(D(o_gen)) ]                (eq. 4)
    R1             L_R1 = E‖D(o_real) − D(o_real + σ·n)‖²,  n ~ N(0, I)  (eq. 6)
    R2             L_R2 = E‖D(o_gen)  − D(o_gen  + σ·n)‖²                (eq. 7)
    total          λ1·L_G  +  λ2·L_D + λ_R1·L_R1 + λ_R2·L_R2             (eq. 8)

with σ = 0.01, λ1 = λ2 = 0.5, λ_R1 = λ_R2 = 0.3 (MoGAN §5.1). R1/R2 replace the gradient
penalties ‖∇D‖² of Roth et al. 2017 by a finite difference: for small σ,
``D(o) − D(o + σn) ≈ −σ ∇D(o)·n``, whose expected square is ``σ²‖∇D(o)‖²`` — no double
backward is needed. Each term goes to its own role's step (the generator term to the generator,
the rest to the discriminator).

Call convention (interchangeable with :class:`~vdot_ext.losses.gan_loss.RelativisticGANLoss`):

* ``loss(logits_fake, logits_real, target)`` with ``target`` ``'generator'`` or
  ``'discriminator'`` returns the weighted scalar. The logistic generator loss does not use
  the real logits (``generator_uses_real = False``), so ``logits_real`` may be None there.
* ``loss.regularizer(discriminator, inputs_real, inputs_fake, logits_real, logits_fake)``
  returns ``{'loss_r1': λ_R1·L_R1, 'loss_r2': λ_R2·L_R2}`` (terms with weight 0 are left out;
  an empty dict when both are off). It runs the discriminator on the perturbed inputs only and
  reuses the clean logits of the discriminator step. A GAN loss without this method has no
  regulariser.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vdot_ext.registry import MODELS

from .utils import raise_nonfinite


@MODELS.register_module()
class LogisticGANLoss(nn.Module):
    """Logistic GAN loss + MoGAN's finite-difference R1/R2 (MoGAN eqs. 4–8).

    Args:
        generator_weight: λ1 (generator loss weight).
        discriminator_weight: λ2 (discriminator loss weight).
        r1_weight: λ_R1 (0 switches R1 off; the MoGAN Table-2 "without R1/R2" ablation sets both
            to 0).
        r2_weight: λ_R2.
        noise_sigma: σ of the input perturbation of R1/R2.
    """

    #: the generator term g(−D(fake)) does not read D(real)
    generator_uses_real = False

    def __init__(self,
                 generator_weight: float = 0.5,
                 discriminator_weight: float = 0.5,
                 r1_weight: float = 0.3,
                 r2_weight: float = 0.3,
                 noise_sigma: float = 0.01):
        super().__init__()
        for field, value in (('generator_weight', generator_weight),
                             ('discriminator_weight', discriminator_weight),
                             ('r1_weight', r1_weight), ('r2_weight', r2_weight)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f'LogisticGANLoss.{field} must be a number ≥ 0, got {value!r}')
        if not isinstance(noise_sigma, (int, float)) or not noise_sigma > 0:
            raise ValueError(f'LogisticGANLoss.noise_sigma must be > 0, got {noise_sigma!r}')
        self.generator_weight = float(generator_weight)
        self.discriminator_weight = float(discriminator_weight)
        self.r1_weight = float(r1_weight)
        self.r2_weight = float(r2_weight)
        self.noise_sigma = float(noise_sigma)

    @property
    def uses_regularizer(self) -> bool:
        return self.r1_weight > 0 or self.r2_weight > 0

    @staticmethod
    def _check_finite(target: str, **logits) -> None:
        for name, value in logits.items():
            if value is not None and not bool(torch.isfinite(value).all()):
                raise_nonfinite('LogisticGANLoss', f'the {target} loss input ({name})', **logits)

    def forward(self, logits_fake: torch.Tensor, logits_real: Optional[torch.Tensor] = None,
                target: str = 'generator') -> torch.Tensor:
        """λ1·mean g(−D_fake) for ``'generator'``; λ2·mean[g(−D_real)] + λ2·mean[g(D_fake)] for
        ``'discriminator'`` (``logits_real`` required there)."""
        if target == 'generator':
            self._check_finite(target, logits_fake=logits_fake)
            return self.generator_weight * F.softplus(-logits_fake.float()).mean()
        if target == 'discriminator':
            if logits_real is None:
                raise ValueError('LogisticGANLoss: the discriminator loss needs logits_real (D(o_real))')
            self._check_finite(target, logits_fake=logits_fake, logits_real=logits_real)
            loss = F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()
            return self.discriminator_weight * loss
        raise ValueError(f"LogisticGANLoss target must be 'generator' or 'discriminator', got {target!r}")

    def perturbation_penalty(self, discriminator: Callable[[torch.Tensor], torch.Tensor],
                             inputs: torch.Tensor, logits: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Unweighted ``mean_b (D(x_b) − D(x_b + σ·n_b))²`` (eq. 6/7) for one batch of inputs.

        ``inputs`` are detached: the penalty trains the discriminator only. ``logits`` = D(inputs)
        from the same step, recomputed when None.
        """
        inputs = inputs.detach()
        if logits is None:
            logits = discriminator(inputs)
        noise = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype,
                            device=inputs.device)
        perturbed = discriminator(inputs + self.noise_sigma * noise)
        diff = logits.float() - perturbed.float()
        if not bool(torch.isfinite(diff).all()):
            raise_nonfinite('LogisticGANLoss', 'the R1/R2 difference D(x) − D(x + σn)',
                            logits=logits, perturbed_logits=perturbed)
        return diff.reshape(diff.shape[0], -1).square().sum(dim=1).mean()

    def regularizer(self, discriminator: Callable[[torch.Tensor], torch.Tensor],
                    inputs_real: Optional[torch.Tensor] = None,
                    inputs_fake: Optional[torch.Tensor] = None,
                    logits_real: Optional[torch.Tensor] = None,
                    logits_fake: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{'loss_r1': λ_R1·L_R1, 'loss_r2': λ_R2·L_R2}`` (eqs. 6–7) for the discriminator step.

        ``inputs_real`` / ``inputs_fake`` are what the discriminator was called on (MoGAN: the
        raw flows o_real, o_gen), ``logits_*`` its outputs on them (reused, not recomputed).
        """
        losses = {}
        terms = (('loss_r1', self.r1_weight, inputs_real, logits_real, 'inputs_real'),
                 ('loss_r2', self.r2_weight, inputs_fake, logits_fake, 'inputs_fake'))
        for key, weight, inputs, logits, name in terms:
            if weight == 0:
                continue
            if inputs is None:
                raise ValueError(f'LogisticGANLoss.regularizer: {key} has weight {weight} but {name} is None')
            losses[key] = weight * self.perturbation_penalty(discriminator, inputs, logits, generator)
        return losses

    def extra_repr(self) -> str:
        return (f'generator_weight={self.generator_weight}, discriminator_weight={self.discriminator_weight}, '
                f'r1_weight={self.r1_weight}, r2_weight={self.r2_weight}, noise_sigma={self.noise_sigma}')
