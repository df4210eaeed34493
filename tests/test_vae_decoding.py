"""Windowed decoding with gradients (MoGAN §4.3, Appendix A; docs/DESIGN.md §13): exact frames, truncated
gradients, checkpointing, bounded memory, and the whole chain x̂0 → decode → flow → D → loss → ∂/∂x̂0."""
import pytest
import torch

from vdot_ext.models.tiny_codecs import TinyWanVAE
from vdot_ext.models.vae_decoding import (
    WindowedVAEDecoding,
    decode_window,
    peak_cpu_memory_bytes,
    pixel_frame_range,
    sample_window,
)
from vdot_ext.registry import MODELS


@pytest.fixture(scope='module')
def vae():
    return TinyWanVAE(dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1, seed=0)  # the demo's tiny VAE


@pytest.fixture(scope='module')
def latents():
    torch.manual_seed(0)
    return torch.randn(1, 16, 5, 4, 4)  # 5 latent chunks → 17 frames of 32 × 32


@pytest.fixture(scope='module')
def full_video(vae, latents):
    with torch.no_grad():
        return vae.decode_with_grad(latents)  # VideoVAE_.decode: the reference, all chunks


@pytest.mark.parametrize('start, stop, ckpt', [(0, 5, False), (0, 2, True), (2, 4, False), (3, 5, True),
                                               (1, 5, True)])
def test_window_equals_the_full_decode(vae, latents, full_video, start, stop, ckpt):
    with torch.enable_grad():
        out = decode_window(vae, latents.clone().requires_grad_(True), start, stop, gradient_checkpointing=ckpt)
    first, last = out.frames
    assert out.chunks == (start, stop) and out.video.shape[2] == last - first
    torch.testing.assert_close(out.video.detach(), full_video[:, :, first:last], rtol=1e-5, atol=1e-5)
    if start == 2:  # the real WanVideoVAE object (TinyWanVAE wraps one) decodes the same way
        torch.testing.assert_close(decode_window(vae.wan_vae, latents, start, stop).video, out.video.detach())


def test_pixel_frame_range():
    assert pixel_frame_range(0, 5) == (0, 17)
    assert pixel_frame_range(0, 13) == (0, 49)     # 13 latent frames = 49 frames
    assert pixel_frame_range(2, 4) == (5, 13)      # 4L frames when the window starts after chunk 0
    assert pixel_frame_range(9, 21) == (33, 81)    # the paper's L = 12 of K = 21: 48 frames
    with pytest.raises(ValueError):
        pixel_frame_range(3, 3)


def test_gradients_stay_inside_the_window_and_checkpointing_is_exact(vae, latents):
    grads = {}
    for ckpt in (False, True):
        x = latents.clone().requires_grad_(True)
        decode_window(vae, x, 2, 4, gradient_checkpointing=ckpt).video.square().sum().backward()
        grads[ckpt] = x.grad
    per_chunk = grads[True].abs().sum(dim=(0, 1, 3, 4))
    assert (per_chunk[2:4] > 0).all(), per_chunk
    # truncated BPTT: the warm-up chunks get no gradient; chunks after the window are never decoded
    assert per_chunk[:2].eq(0).all() and per_chunk[4].eq(0), per_chunk
    torch.testing.assert_close(grads[True], grads[False])
    # inside the window the recurrence is differentiated: chunk 2 also gets gradient from chunk 3's frames
    x = latents.clone().requires_grad_(True)
    decode_window(vae, x, 2, 4).video[:, :, 4:].square().sum().backward()
    assert x.grad[:, :, 2].abs().sum() > 0


def test_sample_window():
    gen = torch.Generator().manual_seed(0)
    starts = {sample_window(21, 12, gen)[0] for _ in range(200)}
    assert starts == set(range(10))  # uniform over every valid start
    assert sample_window(5, None) == (0, 5) and sample_window(5, 8) == (0, 5)
    a = sample_window(21, 12, torch.Generator().manual_seed(3))
    assert a == sample_window(21, 12, torch.Generator().manual_seed(3)) and a[1] - a[0] == 12


def test_registered_entry(vae, latents, full_video):
    decoding = MODELS.build(dict(type='WindowedVAEDecoding', window_chunks=2))
    assert isinstance(decoding, WindowedVAEDecoding)
    out = decoding(vae, latents, generator=torch.Generator().manual_seed(0))
    assert out.chunks[1] - out.chunks[0] == 2
    first, last = out.frames
    torch.testing.assert_close(out.video, full_video[:, :, first:last], rtol=1e-5, atol=1e-5)
    assert decoding(vae, latents, start=1).chunks == (1, 3)
    with pytest.raises(ValueError, match='window_chunks'):
        WindowedVAEDecoding(window_chunks=0)


def test_errors(vae, latents):
    with pytest.raises(TypeError, match='WanVideoVAE or TinyWanVAE'):
        decode_window(torch.nn.Linear(2, 2), latents, 0, 1)
    with pytest.raises(ValueError, match=r'0 ≤ start < stop ≤ K = 5'):
        decode_window(vae, latents, 3, 6)
    with pytest.raises(ValueError, match=r'\[B, 16, K, h, w\]'):
        decode_window(vae, latents[:, :8], 0, 1)


def test_windowed_decoding_bounds_memory(vae):
    """Peak CPU tensor memory of decode + backward (torch profiler). Demo size (17 frames, 64 × 64): full
    unrolled decoding with gradients vs a 2-chunk window with checkpointing. Measured 90.5 vs 39.8 MiB."""
    torch.manual_seed(0)
    z = torch.randn(1, 16, 5, 8, 8)

    def full():
        x = z.clone().requires_grad_(True)
        vae.decode_with_grad(x).square().mean().backward()
        vae.model.clear_cache()

    def windowed():
        x = z.clone().requires_grad_(True)
        decode_window(vae, x, 3, 5).video.square().mean().backward()

    peak_full, _ = peak_cpu_memory_bytes(full)
    peak_window, _ = peak_cpu_memory_bytes(windowed)
    assert peak_window < 0.6 * peak_full, (peak_window / 2**20, peak_full / 2**20)


def test_flow_gradient_reaches_the_generator_sample(vae):
    """x̂0 → windowed decode → flow estimator → motion discriminator → logistic generator loss: the gradient on
    x̂0 is finite and non-zero in the window (MoGAN §4.1: the flow loss reaches the generator)."""
    from vdot_ext.losses.logistic_gan_loss import LogisticGANLoss
    from vdot_ext.models.motion_discriminator import MotionDiscriminator
    from vdot_ext.models.optical_flow import LucasKanadeFlow
    torch.manual_seed(0)
    x0 = (torch.randn(1, 16, 5, 4, 4) * 0.5).requires_grad_(True)
    disc = MotionDiscriminator(torch.randn(4, 32), 'tiny', num_blocks=2, taps=(0, 1), head_attn_dim=24,
                               head_attn_heads=2).requires_grad_(False)
    decoded = WindowedVAEDecoding(window_chunks=2)(vae, x0, start=2)
    video = decoded.video.transpose(1, 2)                        # [B, 3, T, H, W] → [B, T, 3, H, W]
    flows = LucasKanadeFlow()(video)
    assert flows.shape == (1, 7, 2, 32, 32)
    loss = LogisticGANLoss()(disc(flows), None, 'generator')
    loss.backward()
    grad = x0.grad
    assert torch.isfinite(grad).all()
    assert grad[:, :, 2:4].abs().sum() > 0 and grad[:, :, [0, 1, 4]].abs().sum() == 0
