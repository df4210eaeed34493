"""LogisticGANLoss (MoGAN eqs. 4–8; docs/DESIGN.md §5, Eq. 19–20): formulas, R1/R2 on a linear discriminator,
the call convention shared with RelativisticGANLoss, and a discriminator step that changes only D."""
import math

import pytest
import torch
import torch.nn as nn

from vdot_ext.losses.gan_loss import RelativisticGANLoss
from vdot_ext.losses.logistic_gan_loss import LogisticGANLoss
from vdot_ext.registry import MODELS
from vdot_ext.utils import NonFiniteError


def g(x: torch.Tensor) -> torch.Tensor:
    """MoGAN's g(x) = log(1 + eˣ), written out in float64."""
    return torch.log1p(torch.exp(x.double()))


def test_generator_and_discriminator_formulas():
    torch.manual_seed(0)
    fake, real = torch.randn(7) * 3, torch.randn(7) * 3
    loss = LogisticGANLoss(generator_weight=0.7, discriminator_weight=0.4)
    expected_g = 0.7 * g(-fake).mean()
    expected_d = 0.4 * (g(-real).mean() + g(fake).mean())
    torch.testing.assert_close(loss(fake, None, 'generator').double(), expected_g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss(fake, real, 'discriminator').double(), expected_d, rtol=1e-6, atol=1e-7)
    # known value: at D = 0 every term is log 2
    zeros = torch.zeros(3)
    default = LogisticGANLoss()
    assert math.isclose(float(default(zeros, None, 'generator')), 0.5 * math.log(2), rel_tol=1e-6)
    assert math.isclose(float(default(zeros, zeros, 'discriminator')), 0.5 * 2 * math.log(2), rel_tol=1e-6)


def test_gradient_directions():
    """The generator pushes D(fake) up; the discriminator pushes D(real) up and D(fake) down."""
    fake = torch.zeros(4, requires_grad=True)
    real = torch.zeros(4, requires_grad=True)
    loss = LogisticGANLoss()
    loss(fake, real, 'generator').backward()
    assert (fake.grad < 0).all() and real.grad is None
    fake.grad = None
    loss(fake, real, 'discriminator').backward()
    assert (fake.grad > 0).all() and (real.grad < 0).all()
    # d/dx of 0.5·mean softplus(−x) at 0 is −0.5·σ(0)/4
    torch.testing.assert_close(real.grad, torch.full((4,), -0.5 * 0.5 / 4))


class LinearD(nn.Module):
    """D(x) = ⟨w, x⟩ + b over all non-batch dimensions."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(dim=1) + self.b


def test_r1_on_a_linear_discriminator_is_sigma_squared_norm_w_squared():
    """D(x) − D(x + σn) = −σ⟨w, n⟩, so E[(D(x) − D(x + σn))²] = σ² wᵀ E[nnᵀ] w = σ²‖w‖² (n ~ N(0, I)),
    whatever x is: a Monte-Carlo mean over 20 000 samples (relative std √(2/N) = 1 %) within 5 %."""
    torch.manual_seed(0)
    disc = LinearD((2, 3, 4))
    sigma = 0.01
    loss = LogisticGANLoss(r1_weight=1.0, r2_weight=1.0, noise_sigma=sigma)
    x = torch.randn(20000, 2, 3, 4) * 5
    penalty = loss.perturbation_penalty(disc, x, generator=torch.Generator().manual_seed(1)).detach()
    expected = sigma**2 * float(disc.w.detach().square().sum())
    assert abs(float(penalty) / expected - 1) < 0.05, (float(penalty), expected)
    # exactly: the same noise draw gives σ²·mean⟨w, n⟩²
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    exact = sigma**2 * ((noise * disc.w.detach()).flatten(1).sum(dim=1)).square().mean()
    torch.testing.assert_close(penalty, exact, rtol=2e-3, atol=0)


def test_regularizer_weights_terms_and_reuses_logits():
    torch.manual_seed(0)
    disc = LinearD((5,))
    real, fake = torch.randn(64, 5), torch.randn(64, 5)
    loss = LogisticGANLoss(r1_weight=0.3, r2_weight=0.6)
    gen = torch.Generator()
    terms = loss.regularizer(disc, real, fake, disc(real), disc(fake), generator=gen.manual_seed(5))
    assert set(terms) == {'loss_r1', 'loss_r2'}
    r1 = loss.perturbation_penalty(disc, real, generator=gen.manual_seed(5))
    torch.testing.assert_close(terms['loss_r1'], 0.3 * r1)
    # terms with weight 0 are left out; both off → nothing to add (the "without R1/R2" ablation)
    assert set(LogisticGANLoss(r1_weight=0.0).regularizer(disc, None, fake)) == {'loss_r2'}
    off = LogisticGANLoss(r1_weight=0.0, r2_weight=0.0)
    assert not off.uses_regularizer and off.regularizer(disc, None, None) == {}
    with pytest.raises(ValueError, match='inputs_real is None'):
        loss.regularizer(disc, None, fake)
    # the penalty never sends gradient into its inputs (they are the other role's outputs)
    fake_from_generator = fake.clone().requires_grad_(True)
    sum(loss.regularizer(disc, real, fake_from_generator).values()).backward()
    assert fake_from_generator.grad is None and disc.w.grad.abs().sum() > 0


def test_call_convention_matches_relativistic_and_registry():
    fake, real = torch.randn(4), torch.randn(4)
    for cfg in (dict(type='LogisticGANLoss'), dict(type='RelativisticGANLoss')):
        loss = MODELS.build(cfg)
        for target in ('generator', 'discriminator'):
            value = loss(fake, real, target)
            assert value.ndim == 0 and torch.isfinite(value)
    assert isinstance(MODELS.build(dict(type='RelativisticGANLoss')), RelativisticGANLoss)
    assert LogisticGANLoss.generator_uses_real is False


def test_errors():
    loss = LogisticGANLoss()
    with pytest.raises(ValueError, match="'generator' or 'discriminator'"):
        loss(torch.zeros(2), torch.zeros(2), 'critic')
    with pytest.raises(ValueError, match='needs logits_real'):
        loss(torch.zeros(2), None, 'discriminator')
    with pytest.raises(NonFiniteError, match=r'logits_real in batch rows \[1\]'):
        loss(torch.zeros(2), torch.tensor([0.0, float('nan')]), 'discriminator')
    with pytest.raises(NonFiniteError, match='logits_fake'):
        loss(torch.tensor([float('inf')]), None, 'generator')
    with pytest.raises(ValueError, match='noise_sigma'):
        LogisticGANLoss(noise_sigma=0.0)
    with pytest.raises(ValueError, match='r2_weight'):
        LogisticGANLoss(r2_weight=-1.0)


def test_discriminator_step_changes_only_the_discriminator():
    """One MoGAN discriminator step (eq. 4 + R1 + R2) with the real components: a generator's video → frozen
    flow estimator → MotionDiscriminator. The generated flows enter detached, so only D moves."""
    from vdot_ext.models.motion_discriminator import MotionDiscriminator
    from vdot_ext.models.optical_flow import LucasKanadeFlow
    torch.manual_seed(0)
    generator = nn.Parameter(torch.randn(1, 5, 3, 32, 32) * 0.5)          # stands in for G_θ → decode
    disc = MotionDiscriminator(torch.randn(4, 32), 'tiny', num_blocks=2, taps=(0, 1), head_attn_dim=24,
                               head_attn_heads=2)
    flow = LucasKanadeFlow()
    loss = LogisticGANLoss()
    optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    disc_before = {k: v.clone() for k, v in disc.state_dict().items()}
    gen_before = generator.detach().clone()

    real_video = torch.rand(1, 5, 3, 32, 32) * 2 - 1
    o_real = flow(real_video)
    o_gen = flow(torch.tanh(generator)).detach()
    logits_real, logits_fake = disc(o_real), disc(o_gen)
    total = loss(logits_fake, logits_real, 'discriminator')
    total = total + sum(loss.regularizer(disc, o_real, o_gen, logits_real, logits_fake).values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    assert generator.grad is None
    torch.testing.assert_close(generator.detach(), gen_before, rtol=0, atol=0)
    changed = [k for k, v in disc.state_dict().items() if not torch.equal(v, disc_before[k])]
    assert 'final_mlp.3.weight' in changed and 'patch_embedding.weight' in changed
    assert 'prompt_embedding' not in changed  # the fixed condition is a buffer


def test_generator_step_sends_gradient_through_d_into_the_video():
    from vdot_ext.models.motion_discriminator import MotionDiscriminator
    from vdot_ext.models.optical_flow import LucasKanadeFlow
    torch.manual_seed(0)
    video = (torch.rand(1, 5, 3, 32, 32) * 2 - 1).requires_grad_(True)
    disc = MotionDiscriminator(torch.randn(4, 32), 'tiny', num_blocks=2, taps=(0, 1), head_attn_dim=24,
                               head_attn_heads=2).requires_grad_(False)
    LogisticGANLoss()(disc(LucasKanadeFlow()(video)), None, 'generator').backward()
    assert torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0
