"""Per-task condition fidelity against hand computations (VACE's grey, references on white)."""
import math

import pytest
import torch

from vdot_ext.data.synthetic_videos import COLOURS, render_scene, sample_scene, vcu_pixels
from vdot_ext.evaluation.condition_fidelity import (
    caption_colour_fraction,
    condition_fidelity,
    psnr,
    reference_colour_presence,
    vace_grey,
)

T, H, W = 5, 32, 32


def _pixels(task, index=0, options=None):
    scene = sample_scene(0, index)
    video, ref = render_scene(scene, T, H, W)
    return dict(scene=scene, task=task, **vcu_pixels(task, video, ref, options))


def test_psnr_hand_values():
    a = torch.zeros(2, 3, 4)
    assert psnr(a, a) == math.inf
    b = a + 0.1  # MSE 0.01, range 2 → 10·log10(4 / 0.01)
    assert psnr(a, b) == pytest.approx(10 * math.log10(400.0))
    assert psnr(a, b, data_range=1.0) == pytest.approx(20.0)
    # mask: only masked elements count
    c = a.clone()
    c[0] = 1.0
    mask = torch.zeros(2, 1, 1)
    mask[1] = 1
    assert psnr(a, c, mask=mask) == math.inf
    assert psnr(a, c, mask=1 - mask) == pytest.approx(10 * math.log10(4.0))
    with pytest.raises(ValueError, match='shapes'):
        psnr(a, a[:1])
    with pytest.raises(ValueError, match='no element'):
        psnr(a, a, mask=torch.zeros(2, 1, 1))


def test_psnr_gaussian_noise_matches_analytic():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 8, 64, 64)
    sigma = 0.05
    noisy = x + sigma * torch.randn(x.shape, generator=g)
    assert psnr(noisy, x) == pytest.approx(10 * math.log10(4 / sigma**2), abs=0.05)


def test_outpaint_kept_region():
    p = _pixels('mv2v_outpaint')
    assert p['canonical_task'] == 'outpaint' and float(p['masks'].mean()) > 0.2
    # the real video keeps the centre exactly; the border is not scored
    assert condition_fidelity('mv2v_outpaint', p['video'], p)['kept_psnr'] == math.inf
    anything_on_border = p['video'].clone()
    anything_on_border[p['masks'].bool().expand(3, -1, -1, -1)] = 0.9
    assert condition_fidelity('mv2v_outpaint', anything_on_border, p)['kept_psnr'] == math.inf
    g = torch.Generator().manual_seed(1)
    sigma = 0.1
    noisy = p['video'] + sigma * torch.randn(p['video'].shape, generator=g)
    kept = p['masks'] < 0.5
    mse = ((noisy - p['video'])**2)[kept.expand(3, -1, -1, -1)].double().mean()
    value = condition_fidelity('mv2v_outpaint', noisy, p)['kept_psnr']
    assert value == pytest.approx(10 * math.log10(4 / float(mse)))
    assert value == pytest.approx(10 * math.log10(4 / sigma**2), abs=0.3)


def test_gray_luma_psnr_uses_vace_grey():
    p = _pixels('v2v_gray', index=1)
    # the control is VACE's uint8 grey of the video: only its rounding separates them
    real = condition_fidelity('v2v_gray', p['video'], p)['luma_psnr']
    assert real > 55
    # a colour change that keeps VACE's grey (0.114 R + 0.587 G + 0.299 B) is not penalised
    d = torch.tensor([0.1, -0.1 * 0.114 / 0.587, 0.0]).view(3, 1, 1, 1)
    assert condition_fidelity('grey', p['video'] + d, p)['luma_psnr'] == pytest.approx(real, abs=1e-6)
    # one that keeps BT.601 luma is: ΔY = 0.1·(0.114 − 0.299) = −0.0185 (alone: 40.7 dB)
    d601 = torch.tensor([0.1, -0.1 * 0.299 / 0.587, 0.0]).view(3, 1, 1, 1)
    assert condition_fidelity('grey', p['video'] + d601, p)['luma_psnr'] < real - 10
    # an exact control: an offset of 0.1 → PSNR 10·log10(4 / 0.01)
    exact = dict(p, frames=vace_grey(p['video']).float().expand(3, -1, -1, -1))
    assert condition_fidelity('v2v_gray', p['video'] + 0.1, exact)['luma_psnr'] == pytest.approx(
        10 * math.log10(400.0), abs=1e-6)
    assert vace_grey(torch.tensor([1.0, -1.0, -1.0]).view(3, 1))[0, 0] == pytest.approx(
        2 * 0.114 - 1)  # pure red


def test_r2v_reference_colour_presence():
    p = _pixels('r2v', index=2)
    real = condition_fidelity('r2v', p['video'], p)['ref_colour_presence']
    assert 0.6 < real <= 1.0  # the real video shows the referenced object
    grey = condition_fidelity('reference', torch.zeros_like(p['video']), p)['ref_colour_presence']
    assert grey < 0.05
    # hand case: a 4×4 pure red object on white (2×2 interior after the rim is dropped);
    # a frame with 2 red pixels scores 2/4, a frame with ≥ 4 scores 1
    red = torch.tensor([1.0, -1.0, -1.0])
    ref = torch.ones(3, 1, 8, 8)
    ref[:, 0, 2:6, 2:6] = red.view(3, 1, 1)
    video = -torch.ones(3, 2, 8, 8)
    video[:, 0, 0, :2] = red.view(3, 1)  # frame 0: 2 red pixels
    video[:, 1] = red.view(3, 1, 1)  # frame 1: all red
    assert reference_colour_presence(video, ref) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match='no object'):
        reference_colour_presence(video, torch.ones(3, 1, 8, 8))
    # a reference padded with grey instead (ref_fill 0.0)
    grey_ref = torch.zeros(3, 1, 8, 8)
    grey_ref[:, 0, 2:6, 2:6] = red.view(3, 1, 1)
    assert reference_colour_presence(video, grey_ref, background=0.0) == pytest.approx(0.75)


def test_t2v_caption_colour():
    p = _pixels('t2v', index=3)
    colour = torch.tensor(COLOURS[p['scene']['colour']])
    real = condition_fidelity('t2v', p['video'], p)['caption_colour_fraction']
    assert real > 0.01
    painted = (colour * 2 - 1).view(3, 1, 1, 1).expand(3, T, H, W)
    assert condition_fidelity('t2v', painted, p)['caption_colour_fraction'] == 1.0
    # hand case: half the pixels at the colour, half far away
    half = painted.clone()
    half[:, :, :, :W // 2] = ((1 - colour) * 2 - 1).view(3, 1, 1, 1)
    if (colour - (1 - colour)).norm() > 0.2:
        assert caption_colour_fraction(half, colour.tolist()) == pytest.approx(0.5)
    assert condition_fidelity('t2v', p['video'], {k: v for k, v in p.items() if k != 'scene'}) == {}


def test_bad_inputs():
    p = _pixels('mv2v_outpaint')
    with pytest.raises(ValueError, match='video'):
        condition_fidelity('mv2v_outpaint', p['video'][None], p)
    with pytest.raises(ValueError, match='differs'):
        condition_fidelity('mv2v_outpaint', p['video'][:, :3], p)
    with pytest.raises(ValueError, match='unknown task'):
        condition_fidelity('depth', p['video'], p)


def test_task_aliases_and_extension_kept_frames():
    p = _pixels('mv2v_outpaint')
    noisy = p['video'] + 0.05 * torch.randn(p['video'].shape, generator=torch.Generator().manual_seed(2))
    assert condition_fidelity('outpaint', noisy, p) == condition_fidelity('mv2v_outpaint', noisy, p)
    e = _pixels('lastframe')
    assert e['canonical_task'] == 'extension' and e['info']['kept_frames'] == [T - 1]
    changed = e['video'].clone()
    changed[:, :T - 1] = -1  # only generated frames differ: nothing kept was changed
    assert condition_fidelity('extension', changed, e)['kept_psnr'] == math.inf
    changed[:, T - 1] += 0.1
    assert condition_fidelity('lastframe', changed, e)['kept_psnr'] < 30
