"""Optical-flow estimators (docs/DESIGN.md §13): Lucas–Kanade accuracy on known motion, differentiability,
frozen state; RAFT from a local file only (missing-file error, random weights load, run, differentiate)."""
import math
import os.path as osp

import pytest
import torch

from vdot_ext.models.optical_flow import (
    LucasKanadeFlow,
    OpticalFlowEstimator,
    RAFTFlow,
    build_flow_estimator,
    raft_weight_file_name,
    resize_flow,
    warp,
)


# ------------------------------------------------------------------ synthetic frames with known flow
def texture(x: torch.Tensor, y: torch.Tensor, seed: int = 0, waves: int = 24) -> torch.Tensor:
    """A smooth RGB texture in [-1, 1], defined everywhere (sum of plane waves): sampling it at moved
    coordinates gives an exactly moved frame, with no interpolation error."""
    g = torch.Generator().manual_seed(seed)
    freq = (0.05 + 0.35 * torch.rand(waves, generator=g)).double()  # rad / px
    angle = (2 * math.pi * torch.rand(waves, generator=g)).double()
    phase = (2 * math.pi * torch.rand(waves, generator=g)).double()
    amp = (torch.rand(3, waves, generator=g) / waves**0.5).double()
    arg = ((freq * torch.cos(angle))[:, None, None] * x + (freq * torch.sin(angle))[:, None, None] * y
           + phase[:, None, None])
    return torch.einsum('cn,nhw->chw', amp, torch.sin(arg)).clamp(-1, 1)


def moved_pair(size: int, motion, seed: int = 0):
    """(frame1, frame2, true flow) with frame2(p + flow(p)) = frame1(p)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing='ij')
    if motion[0] == 'translate':
        dx, dy = motion[1:]
        flow = torch.stack((torch.full_like(xs, dx), torch.full_like(ys, dy)))
        x2, y2 = xs - dx, ys - dy
    else:  # rotation by motion[1] degrees about the centre
        theta = math.radians(motion[1])
        c, s, centre = math.cos(theta), math.sin(theta), (size - 1) / 2
        flow = torch.stack((c * (xs - centre) - s * (ys - centre) + centre - xs,
                            s * (xs - centre) + c * (ys - centre) + centre - ys))
        x2 = c * (xs - centre) + s * (ys - centre) + centre   # R⁻¹(q − c) + c
        y2 = -s * (xs - centre) + c * (ys - centre) + centre
    return (texture(xs, ys, seed).float()[None], texture(x2, y2, seed).float()[None], flow.float()[None])


TRANSLATIONS = [('translate', 0.5, 0.0), ('translate', 1.3, -0.7), ('translate', 2.7, 1.1),
                ('translate', -4.2, 3.1), ('translate', 6.0, 0.0)]
ROTATIONS = [('rotate', 1.0), ('rotate', 3.0), ('rotate', 5.0)]
MARGIN = 8  # content entering the frame is unknowable: the interior excludes 8 px (> largest motion)


def end_point_errors(estimator, motion, size=64):
    frame1, frame2, truth = moved_pair(size, motion)
    epe = (estimator.pair_flow(frame1, frame2) - truth).norm(dim=1)[0]
    return float(epe.mean()), float(epe[MARGIN:-MARGIN, MARGIN:-MARGIN].mean())


# measured (64×64, default LucasKanadeFlow): interior EPE 0.026 / 0.086 / 0.107 / 0.122 / 0.159 px on the
# translations, 0.037 / 0.058 / 0.080 px on the rotations; full frame ≤ 0.86 px (content entering the frame
# has no true match); thresholds leave ~50 % headroom
@pytest.mark.parametrize('motion, interior_max', [(m, 0.25) for m in TRANSLATIONS] + [(m, 0.12) for m in ROTATIONS])
def test_lucas_kanade_end_point_error(motion, interior_max):
    full, interior = end_point_errors(LucasKanadeFlow(), motion)
    assert interior < interior_max, (motion, full, interior)
    assert full < 1.2, (motion, full, interior)


def test_brightness_flicker_is_not_motion():
    """The per-level high-pass removes a brightness offset between frames; plain Lucas–Kanade turns it into
    large spurious flow."""
    frame, _, _ = moved_pair(64, ('translate', 0.0, 0.0))
    frame = 0.6 * frame
    brighter = frame + 0.3
    robust = LucasKanadeFlow().pair_flow(frame, brighter).norm(dim=1).max()
    plain = LucasKanadeFlow(highpass_sigma=None).pair_flow(frame, brighter).norm(dim=1).max()
    assert robust < 1e-3 and plain > 1.0, (float(robust), float(plain))


def test_lucas_kanade_beats_zero_flow_and_one_level():
    """The coarse-to-fine pyramid is what handles large motion: one level fails at 6 px."""
    motion = ('translate', 6.0, 0.0)
    _, pyramid = end_point_errors(LucasKanadeFlow(), motion)
    _, single = end_point_errors(LucasKanadeFlow(levels=1), motion)
    assert pyramid < 0.2 and single > 1.0, (pyramid, single)


def test_video_layout_and_channel_order():
    frame1, frame2, _ = moved_pair(64, ('translate', 2.0, -1.0))
    frame3 = moved_pair(64, ('translate', 4.0, -2.0))[1]
    video = torch.stack((frame1, frame2, frame3), dim=1).repeat(2, 1, 1, 1, 1)  # [2, 3, 3, H, W]
    est = LucasKanadeFlow()
    flows = est(video)
    assert flows.shape == (2, 2, 2, 64, 64)
    inner = flows[..., MARGIN:-MARGIN, MARGIN:-MARGIN].mean(dim=(-1, -2))
    # channel 0 = x (right), channel 1 = y (down), in pixels, frame t → t+1
    assert torch.allclose(inner, torch.tensor([2.0, -1.0]).expand(2, 2, 2), atol=0.15), inner
    torch.testing.assert_close(flows[0, 0], est.pair_flow(frame1, frame2)[0])
    est.pairs_per_call = 1
    torch.testing.assert_close(est(video), flows)


def test_lucas_kanade_is_differentiable_in_the_frames():
    frame1, frame2, _ = moved_pair(32, ('translate', 1.0, 0.5))
    video = torch.stack((frame1, frame2), dim=1).double().requires_grad_(True)
    est = LucasKanadeFlow()
    flows = est(video)
    assert flows.dtype == torch.float64
    weights = torch.randn_like(flows)
    (flows * weights).sum().backward()
    grad = video.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # directional derivative against central finite differences (float64)
    direction = torch.randn_like(video) * 1e-2
    with torch.no_grad():
        eps = 1e-4
        plus = (est(video + eps * direction) * weights).sum()
        minus = (est(video - eps * direction) * weights).sum()
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((grad * direction).sum())
    assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(numeric)), (numeric, analytic)


def test_estimators_stay_frozen_and_in_eval():
    est = LucasKanadeFlow().train()
    assert not est.training
    with pytest.raises(ValueError, match='LucasKanadeFlow.warps'):
        LucasKanadeFlow(warps=0)
    with pytest.raises(ValueError, match=r'\[B, T, 3, H, W\]'):
        est(torch.zeros(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match='at least 2 frames'):
        est(torch.zeros(1, 1, 3, 8, 8))


def test_warp_and_resize_flow_units():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    shift = torch.zeros(1, 2, 4, 4)
    shift[:, 0] = 1.0  # sample one pixel to the right
    torch.testing.assert_close(warp(image, shift)[..., :3], image[..., 1:])
    flow = torch.ones(1, 2, 9, 17) * torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    small = resize_flow(flow, (5, 9))
    torch.testing.assert_close(small[:, 0], torch.full((1, 5, 9), 2.0 * 8 / 16))
    torch.testing.assert_close(small[:, 1], torch.full((1, 5, 9), 4.0 * 4 / 8))


def test_build_flow_estimator():
    assert isinstance(build_flow_estimator(None), LucasKanadeFlow)
    est = build_flow_estimator(dict(type='LucasKanadeFlow', levels=2))
    assert isinstance(est, LucasKanadeFlow) and est.levels == 2
    with pytest.raises(TypeError, match='OpticalFlowEstimator'):
        build_flow_estimator('raft')


# --------------------------------------------------------------------------------------------- RAFT
def test_raft_missing_file_names_the_torchvision_file(tmp_path, monkeypatch):
    assert raft_weight_file_name('large') == 'raft_large_C_T_SKHT_V2-ff5fadd5.pth'
    assert raft_weight_file_name('small') == 'raft_small_C_T_V2-01064c6d.pth'
    with pytest.raises(FileNotFoundError, match='raft_large_C_T_SKHT_V2-ff5fadd5.pth') as info:
        RAFTFlow('large', weights_path=str(tmp_path))
    assert 'nothing is downloaded' in str(info.value) and 'RAFTFlow.weights_path' in str(info.value)
    with pytest.raises(FileNotFoundError, match='raft_small_C_T_V2-01064c6d.pth'):
        RAFTFlow('small', weights_path=str(tmp_path / 'nope.pth'))
    # default location: torchvision's cache directory under $TORCH_HOME, never the network
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with pytest.raises(FileNotFoundError, match=r'torch_home.*raft_large_C_T_SKHT_V2-ff5fadd5.pth'):
        RAFTFlow('large')
    with pytest.raises(ValueError, match='Raft_Small_Weights entry'):
        RAFTFlow('small', weights='C_T_SKHT_V2', weights_path=str(tmp_path))
    with pytest.raises(ValueError, match='variant'):
        RAFTFlow('medium', weights_path=str(tmp_path))


@pytest.fixture(scope='module')
def raft_small_file(tmp_path_factory):
    from torchvision.models.optical_flow import raft_small
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('raft')
    path = osp.join(folder, raft_weight_file_name('small'))
    torch.save(raft_small(weights=None).state_dict(), path)
    return path


def test_raft_random_weights_load_run_and_differentiate(raft_small_file, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError('RAFTFlow tried to download weights')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_network)
    est = RAFTFlow('small', weights_path=osp.dirname(raft_small_file), num_flow_updates=2)
    assert isinstance(est, OpticalFlowEstimator) and est.weights_path == raft_small_file
    assert not est.training and not any(p.requires_grad for p in est.parameters())
    est.train()
    assert not est.model.training  # BatchNorm statistics never move
    video = (torch.rand(1, 3, 3, 64, 64) * 2 - 1).requires_grad_(True)
    flows = est(video)  # 64 px < RAFT's 128: upsampled, flow resampled back to input pixels
    assert flows.shape == (1, 2, 2, 64, 64) and torch.isfinite(flows).all()
    flows.square().mean().backward()
    assert torch.isfinite(video.grad).all() and video.grad.abs().sum() > 0
    # weights really come from the file: a second load gives identical flows
    again = RAFTFlow('small', weights_path=raft_small_file, num_flow_updates=2)
    torch.testing.assert_close(again(video.detach()), flows.detach())
    # odd sizes: padded to multiples of 8 and cropped back
    assert est(torch.rand(1, 2, 3, 132, 140) * 2 - 1).shape == (1, 1, 2, 132, 140)
    assert 'raft_small' in est.name


def test_raft_small_frames_flow_is_in_input_pixels(raft_small_file, monkeypatch):
    """Frames below 128 px run RAFT upsampled; its flow (in upsampled pixels) comes back in input pixels."""
    est = RAFTFlow('small', weights_path=raft_small_file, num_flow_updates=1)
    seen = {}

    def constant_raft(image1, image2):
        seen['size'] = tuple(image1.shape[-2:])
        return torch.ones(image1.shape[0], 2, *image1.shape[-2:]) * 4.0  # 4 px at RAFT's resolution

    monkeypatch.setattr(est, '_raft', constant_raft)
    flow = est.pair_flow(torch.zeros(1, 3, 64, 96), torch.zeros(1, 3, 64, 96))
    assert seen['size'] == (128, 192) and flow.shape == (1, 2, 64, 96)
    torch.testing.assert_close(flow[:, 0], torch.full((1, 64, 96), 4.0 * 95 / 191))
    torch.testing.assert_close(flow[:, 1], torch.full((1, 64, 96), 4.0 * 63 / 127))


def test_raft_wrong_state_dict_is_an_error(raft_small_file, tmp_path):
    wrong = tmp_path / raft_weight_file_name('large')
    with open(raft_small_file, 'rb') as handle:
        wrong.write_bytes(handle.read())  # small weights under the large name
    with pytest.raises(ValueError, match='not a torchvision raft_large state dict'):
        RAFTFlow('large', weights_path=str(wrong))
