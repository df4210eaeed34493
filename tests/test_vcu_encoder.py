"""encode_vcu == diffsynth's own VACE unit (WanVideoUnit_VACE.process)."""
import numpy as np
import pytest
import torch
from PIL import Image

from vdot_ext.models.tiny_codecs import TinyWanVAE
from vdot_ext.patches.vcu import encode_vcu

T, H, W = 9, 32, 48


@pytest.fixture(scope='module')
def vae():
    vae = TinyWanVAE(dim=8, seed=0)
    # a non-trivial normalisation so a missing scale step would show
    vae.set_latent_scale(torch.linspace(-0.5, 0.5, 16), torch.linspace(0.5, 1.5, 16))
    return vae


@pytest.fixture(scope='module')
def pipe(vae):
    from diffsynth.pipelines.wan_video import WanVideoPipeline
    pipe = WanVideoPipeline(device='cpu', torch_dtype=torch.float32)
    pipe.vae = vae.wan_vae
    return pipe


def _uint8_case(seed, t=T, with_ref=True):
    """uint8 frames / binary masks / reference, as PIL (diffsynth) and tensors (ours)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(t, H, W, 3), dtype=np.uint8)
    masks = np.zeros((t, H, W), np.uint8)
    masks[:, :8] = 255  # generate the top rows...
    masks[t // 2:, :, -16:] = 255  # ...and a right block in later frames
    ref = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    pil = dict(vace_video=[Image.fromarray(f) for f in frames],
               vace_video_mask=[Image.fromarray(np.stack([m] * 3, -1)) for m in masks],
               vace_reference_image=Image.fromarray(ref) if with_ref else None)
    ours = dict(frames=torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] * (2 / 255) - 1,
                masks=torch.from_numpy(masks).float()[None, None] / 255,
                ref_images=(torch.from_numpy(ref).float().permute(2, 0, 1)[None, :, None] * (2 / 255) - 1)
                if with_ref else None)
    return pil, ours


def _diffsynth(pipe, pil, t=T):
    from diffsynth.pipelines.wan_video import WanVideoUnit_VACE
    with torch.no_grad():
        out = WanVideoUnit_VACE().process(pipe, vace_scale=1.0, height=H, width=W, num_frames=t,
                                          tiled=False, tile_size=(34, 34), tile_stride=(18, 16), **pil)
    return out['vace_context']


@pytest.mark.parametrize('with_ref', [False, True])
@pytest.mark.parametrize('batched', [True, False])
def test_equals_diffsynth_vace_unit(vae, pipe, with_ref, batched):
    pil, ours = _uint8_case(0, with_ref=with_ref)
    expected = _diffsynth(pipe, pil)
    got = encode_vcu(vae, ours['frames'], ours['masks'], ours['ref_images'], batched=batched)
    n_ref = 1 if with_ref else 0
    assert got.shape == (1, 96, n_ref + (T - 1) // 4 + 1, H // 8, W // 8)
    assert expected.shape == got.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    if with_ref:
        assert got[:, 16:32, 0].abs().sum() == 0  # reference padded with zeros to 32 ch
        assert got[:, 32:, 0].abs().sum() == 0  # reference frame gets a zero mask
        assert got[:, 32:, 1:].sum() > 0


def test_t2v_defaults_equal_diffsynth(vae, pipe):
    """diffsynth's T2V-style VACE input: no video (it defaults to zeros), all-255 mask."""
    from diffsynth.pipelines.wan_video import WanVideoUnit_VACE
    ones = [Image.fromarray(np.full((H, W, 3), 255, np.uint8))] * T
    with torch.no_grad():
        expected = WanVideoUnit_VACE().process(
            pipe, vace_video=None, vace_video_mask=ones, vace_reference_image=None, vace_scale=1.0,
            height=H, width=W, num_frames=T, tiled=False, tile_size=(34, 34),
            tile_stride=(18, 16))['vace_context']
    got = encode_vcu(vae, torch.zeros(1, 3, T, H, W), torch.ones(1, 1, T, H, W))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.all(got[:, 32:] == 1)
    # grey frames: inactive and reactive are both the VAE code of zeros
    assert torch.allclose(got[:, :16], got[:, 16:32])


def test_batch_equals_single_calls(vae):
    cases = [_uint8_case(s)[1] for s in (2, 3)]
    frames = torch.cat([c['frames'] for c in cases])
    masks = torch.cat([c['masks'] for c in cases])
    refs_tensor = torch.cat([c['ref_images'] for c in cases])
    batch = encode_vcu(vae, frames, masks, refs_tensor)
    singles = torch.cat([encode_vcu(vae, c['frames'], c['masks'], c['ref_images']) for c in cases])
    assert torch.allclose(batch, singles, atol=1e-6)
    # two references as a list of [B, 3, 1, H, W] == a [B, 3, 2, H, W] tensor
    two = encode_vcu(vae, frames, masks, [refs_tensor, refs_tensor.flip(0)])
    assert two.shape[2] == 2 + (T - 1) // 4 + 1
    assert torch.allclose(two, encode_vcu(vae, frames, masks,
                                          torch.cat([refs_tensor, refs_tensor.flip(0)], 2)))
    assert torch.allclose(two[:, :, 2:], batch[:, :, 1:], atol=1e-6)


def test_encode_videos_batched_and_zero_broadcast_equal_wan_loop(vae):
    from vdot_ext.patches.vcu import encode_videos
    x = torch.rand(4, 3, 5, 16, 16) * 2 - 1
    x[1] = 0  # all-grey rows are encoded once and broadcast
    x[3] = 0
    loop = vae.wan_vae.encode(x, device='cpu')
    assert torch.allclose(encode_videos(vae.wan_vae, x, batched=True), loop, atol=1e-5)
    assert torch.equal(encode_videos(vae.wan_vae, x, batched=False), loop)
    assert torch.allclose(encode_videos(vae.wan_vae, torch.zeros(2, 3, 5, 16, 16)), loop[[1, 3]],
                          atol=1e-5)


def test_mask_is_binarised_and_unshuffled(vae):
    frames = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    masks = torch.zeros(1, 1, 5, 16, 16)
    masks[..., 3, 9] = 0.7  # pixel (3, 9): latent (0, 1), channel 3·8 + 1
    soft = masks.clone()
    soft[..., 0, 0] = 0.3  # below 0.5: not generated
    out = encode_vcu(vae, frames, soft)
    mask_lat = out[0, 32:]
    assert mask_lat.shape == (64, 2, 2, 2)
    assert mask_lat.sum() == 2  # nearest-exact in time: 5 → 2 frames picks frames 1 and 3, both marked
    assert torch.all(mask_lat[3 * 8 + 1, :, 0, 1] == 1)
    # inactive/reactive use the binarised mask
    hard = encode_vcu(vae, frames, (soft > 0.5).float())
    assert torch.equal(out, hard)


def test_runs_without_grad(vae):
    frames = (torch.rand(1, 3, 5, 16, 16) * 2 - 1).requires_grad_(True)
    out = encode_vcu(vae, frames, torch.ones(1, 1, 5, 16, 16))
    assert not out.requires_grad


@pytest.mark.parametrize('frames, masks, refs, match', [
    ((1, 3, 5, 16, 16), (1, 1, 9, 16, 16), None, 'masks: 9 frames'),
    ((1, 3, 5, 16, 16), (1, 1, 5, 16, 32), None, 'masks: size'),
    ((1, 3, 5, 16, 16), (2, 1, 5, 16, 16), None, 'masks: batch size'),
    ((1, 3, 5, 16, 16), (1, 3, 5, 16, 16), None, r'masks: expected \[B, 1'),
    ((1, 3, 6, 16, 16), (1, 1, 6, 16, 16), None, '4k\\+1'),
    ((1, 3, 5, 24, 16), (1, 1, 5, 24, 16), None, 'multiples of 16'),
    ((1, 3, 5, 16, 16), (1, 1, 5, 16, 16), (1, 3, 1, 32, 32), 'ref_images: size'),
    ((1, 3, 5, 16, 16), (1, 1, 5, 16, 16), (2, 3, 1, 16, 16), 'ref_images: batch'),
])
def test_shape_errors_name_the_field(vae, frames, masks, refs, match):
    with pytest.raises(ValueError, match=match):
        encode_vcu(vae, torch.zeros(frames), torch.ones(masks),
                   None if refs is None else torch.zeros(refs))


def test_rejects_non_wan_vae():
    with pytest.raises(TypeError, match='WanVideoVAE'):
        encode_vcu(torch.nn.Linear(2, 2), torch.zeros(1, 3, 5, 16, 16), torch.ones(1, 1, 5, 16, 16))
