"""DMDLoss, DenoisingLoss and RelativisticGANLoss against their formulas (docs/DESIGN.md §5)."""
import pytest
import torch
import torch.nn.functional as F

from vdot_ext.registry import MODELS
from vdot_ext.utils import NonFiniteError


def _inputs(seed=0, shape=(2, 16, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)
    fake = torch.randn(shape, generator=g, dtype=torch.float64)
    real = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, fake, real


def test_dmd_gradient_matches_formula():
    """∂L/∂x = (x0_fake − x0_real) / mean|x − x0_real| / numel, per sample."""
    x, fake, real = _inputs()
    loss = MODELS.build(dict(type='DMDLoss'))(x, fake, real)
    (grad, ) = torch.autograd.grad(loss, x)
    norm = (x.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    expected = (fake - real) / norm / x.numel()
    torch.testing.assert_close(grad, expected.to(grad.dtype), rtol=1e-5, atol=1e-9)
    # the value is 0.5·mean(grad_target²): x − sg(x − g) = g
    g = (fake - real) / norm
    torch.testing.assert_close(loss.double(), 0.5 * g.square().mean(), rtol=1e-5, atol=0)


def test_dmd_sign_moves_x_towards_teacher():
    """A gradient step on the loss moves x0 from the fake towards the real score."""
    x, fake, real = _inputs(1)
    loss_fn = MODELS.build(dict(type='DMDLoss', normalize='none'))
    (grad, ) = torch.autograd.grad(loss_fn(x, fake, real), x)
    # -grad is parallel to (real − fake)
    cos = F.cosine_similarity((-grad).flatten(), (real - fake).flatten(), dim=0)
    assert cos > 0.999


def test_dmd_sigma_option():
    """normalize='sigma' is the public stage-2 normaliser (bi_dmd_gan.py: grad · t/1000);
    scale_by_sigma composes σ with another normaliser."""
    x, fake, real = _inputs(2)
    t = torch.tensor([250.0, 750.0])
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    for cfg in (dict(normalize='sigma'), dict(normalize='none', scale_by_sigma=True)):
        loss_fn = MODELS.build(dict(type='DMDLoss', **cfg))
        (grad, ) = torch.autograd.grad(loss_fn(x, fake, real, t), x)
        expected = (fake - real) * sigma / x.numel()
        torch.testing.assert_close(grad, expected.to(grad.dtype), rtol=1e-5, atol=1e-9)
        with pytest.raises(ValueError, match='timestep'):
            loss_fn(x, fake, real)
    both = MODELS.build(dict(type='DMDLoss', normalize='mean_abs', scale_by_sigma=True))
    (grad, ) = torch.autograd.grad(both(x, fake, real, t), x)
    norm = (x.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(grad, ((fake - real) / norm * sigma / x.numel()).to(grad.dtype),
                               rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match='normalize'):
        MODELS.build(dict(type='DMDLoss', normalize='l3'))


@pytest.mark.parametrize('normalize', ['mean_abs', 'sigma', 'none'])
@pytest.mark.parametrize('bad_input', ['x', 'pred_fake_x0', 'pred_real_x0'])
def test_dmd_nonfinite_input_is_an_error_not_a_zero_gradient(normalize, bad_input):
    """The public code's nan_to_num zeroes a NaN gradient silently; ours names the input and
    the batch row (docs/DESIGN.md §11), so the training step skips the batch."""
    x, fake, real = _inputs(3)
    inputs = dict(x=x.detach().clone(), pred_fake_x0=fake, pred_real_x0=real)
    inputs[bad_input] = inputs[bad_input].clone()
    inputs[bad_input][1, 0, 0, 0, 0] = float('nan')
    inputs['x'].requires_grad_(True)
    loss_fn = MODELS.build(dict(type='DMDLoss', normalize=normalize))
    with pytest.raises(NonFiniteError, match=rf'{bad_input} in batch rows \[1\]'):
        loss_fn(**inputs, t=torch.tensor([300.0, 600.0]))
    # an overflow from finite inputs is an error too
    huge = dict(x=x.float(), pred_fake_x0=fake.float() * 1e30, pred_real_x0=-real.float() * 1e30)
    with pytest.raises(NonFiniteError, match='overflow'):
        MODELS.build(dict(type='DMDLoss', normalize='none'))(**huge)


def test_denoising_and_gan_losses_reject_nonfinite_inputs():
    g = torch.Generator().manual_seed(4)
    v, x0, eps = (torch.randn(2, 16, 2, 4, 4, generator=g) for _ in range(3))
    x0[1, 0, 0, 0, 0] = float('inf')
    with pytest.raises(NonFiniteError, match=r'x0 in batch rows \[1\]'):
        MODELS.build(dict(type='DenoisingLoss'))(v, x0, eps)
    gan = MODELS.build(dict(type='RelativisticGANLoss'))
    # softplus(−∞) = 0: without the check an infinite logit gives a finite, silent loss
    d_fake, d_real = torch.tensor([float('inf'), 0.0]), torch.tensor([0.0, 1.0])
    with pytest.raises(NonFiniteError, match=r'logits_fake in batch rows \[0\]'):
        gan(d_fake, d_real, 'generator')
    with pytest.raises(NonFiniteError, match='logits_real'):
        gan(d_real, torch.tensor([float('nan'), 0.0]), 'discriminator')


def test_denoising_loss_is_velocity_mse():
    g = torch.Generator().manual_seed(3)
    v, x0, eps = (torch.randn(2, 16, 2, 4, 4, generator=g) for _ in range(3))
    loss = MODELS.build(dict(type='DenoisingLoss', loss_weight=2.0))(v, x0, eps)
    torch.testing.assert_close(loss, 2.0 * ((v - (eps - x0)) ** 2).mean())


def test_denoising_loss_x0_target_is_the_paper_form():
    """target='x0' (VDOT Eq. 13): mean((x0_pred − x0)²) with x0_pred = x_t − σ·v_pred."""
    g = torch.Generator().manual_seed(5)
    v, x0, eps = (torch.randn(2, 16, 2, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([200.0, 900.0])
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    loss_fn = MODELS.build(dict(type='DenoisingLoss', target='x0'))
    torch.testing.assert_close(loss_fn(v, x0, eps, t), ((x_t - sigma * v - x0) ** 2).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match='timestep'):
        loss_fn(v, x0, eps)
    with pytest.raises(ValueError, match='target'):
        MODELS.build(dict(type='DenoisingLoss', target='eps'))


def test_relativistic_gan_losses():
    d_fake = torch.tensor([0.3, -1.2, 2.0])
    d_real = torch.tensor([1.0, 0.5, -0.4])
    gan = MODELS.build(dict(type='RelativisticGANLoss', loss_weight=0.1))
    torch.testing.assert_close(gan(d_fake, d_real, 'generator'),
                               0.1 * F.softplus(-(d_fake - d_real)).mean())
    torch.testing.assert_close(gan(d_fake, d_real, 'discriminator'),
                               0.1 * F.softplus(-(d_real - d_fake)).mean())
    with pytest.raises(ValueError, match='target'):
        gan(d_fake, d_real, 'critic')
