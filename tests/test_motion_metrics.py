"""Motion metrics (docs/DESIGN.md §13): VBench's dynamics degree and the warping error, on synthetic videos with
known motion (static, uniform translation, brightness flicker), weight-free by default and with RAFT when given."""
import math
import os.path as osp

import pytest
import torch

from vdot_ext.evaluation.motion_metrics import (
    dynamic_degree,
    forward_backward_valid,
    motion_metrics,
    summarize,
    top_fraction_magnitude,
    vbench_dynamic_params,
    warping_error,
)
from vdot_ext.models.optical_flow import LucasKanadeFlow, RAFTFlow, raft_weight_file_name


def texture(x, y, seed=0, waves=24):
    """Smooth RGB texture with values in about [-1, 1] (sum of plane waves), defined at any coordinate."""
    g = torch.Generator().manual_seed(seed)
    freq = (0.05 + 0.35 * torch.rand(waves, generator=g)).double()
    angle = (2 * math.pi * torch.rand(waves, generator=g)).double()
    phase = (2 * math.pi * torch.rand(waves, generator=g)).double()
    amp = (torch.rand(3, waves, generator=g) / waves**0.5).double()
    arg = ((freq * torch.cos(angle))[:, None, None] * x + (freq * torch.sin(angle))[:, None, None] * y
           + phase[:, None, None])
    return torch.einsum('cn,nhw->chw', amp, torch.sin(arg))


def synthetic_video(kind, frames=9, size=64, velocity=(2.0, 1.0), seed=0):
    """[1, T, 3, H, W] in [-1, 1]: ``static``; ``translate`` (every frame moves by ``velocity`` px);
    ``flicker`` (static content, brightness alternating by ±0.3, i.e. ±0.15 in [0, 1] units)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing='ij')
    out = []
    for t in range(frames):
        if kind == 'translate':
            frame = 0.5 * texture(xs - velocity[0] * t, ys - velocity[1] * t, seed)
        else:
            frame = 0.5 * texture(xs, ys, seed)
            if kind == 'flicker':
                frame = frame + (0.3 if t % 2 else -0.3)
        out.append(frame.float())
    video = torch.stack(out)[None]
    assert video.abs().max() <= 1.0
    return video


def test_static_video():
    m = motion_metrics(synthetic_video('static'))
    assert m['dynamic_degree'] == 0.0 and m['motion_magnitude'] < 1e-4
    assert m['warping_error'] < 1e-10 and m['valid_fraction'] == 1.0
    assert m['estimator'].startswith('LucasKanadeFlow') and m['num_videos'] == 1


def test_uniform_translation():
    """2.24 px per frame > VBench's 1.5 px threshold at 64 px: dynamic; warping explains it (tiny error)."""
    video = synthetic_video('translate')
    m = motion_metrics(video)
    assert m['dynamic_degree'] == 1.0
    assert 1.2 < m['motion_magnitude'] < 3.0, m  # top-5 % |flow| / thres: measured 1.98 (borders), true 1.49
    assert m['warping_error'] < 5e-4, m          # measured 1.1e-5
    assert m['valid_fraction'] > 0.85, m         # pixels leaving the frame are excluded (measured 0.92)
    # a translation slower than the threshold is not dynamic
    slow = motion_metrics(synthetic_video('translate', velocity=(0.5, 0.0)))
    assert slow['dynamic_degree'] == 0.0 and slow['motion_magnitude'] < 1.0, slow


def test_flicker_is_inconsistent_not_dynamic():
    """Brightness flicker: no motion (flow ≈ 0) but frame t+1 warped to t differs by 0.3 everywhere in [0, 1]
    units: E_warp = 0.3² = 0.09."""
    flicker = motion_metrics(synthetic_video('flicker'))
    translate = motion_metrics(synthetic_video('translate'))
    assert flicker['dynamic_degree'] == 0.0, flicker
    assert abs(flicker['warping_error'] - 0.09) < 0.005, flicker
    assert flicker['warping_error'] > 100 * translate['warping_error']


def test_batch_of_videos_and_summary():
    videos = torch.cat([synthetic_video('static'), synthetic_video('translate'), synthetic_video('flicker')])
    dyn = dynamic_degree(videos)
    assert dyn['is_dynamic'] == [False, True, False]
    assert dyn['dynamic_degree'] == pytest.approx(1 / 3)
    per_video = warping_error(videos)['per_video']
    assert per_video[0] < 1e-10 < per_video[1] < 1e-3 < per_video[2]
    stats = summarize([dict(dynamic_degree=0.5, motion_magnitude=1.0, warping_error=0.1),
                       dict(dynamic_degree=1.0, motion_magnitude=2.0, warping_error=0.3)])
    assert stats['dynamic_degree']['mean'] == 0.75
    assert stats['warping_error']['std'] == pytest.approx(math.sqrt(0.02))


def test_vbench_parameters_and_decision_rule():
    """VBench dynamic_degree.py: thres = max(1, 8/fps)·6·min(H, W)/256; count_num = round(4·n/16); dynamic iff
    ≥ count_num pairs score (mean of the top 5 % of |flow|) above thres; frames subsampled to ~8 fps."""
    assert vbench_dynamic_params(256, 320, 16) == dict(thres=6.0, count_num=4)
    assert vbench_dynamic_params(480, 832, 49, fps=4.0) == dict(thres=2 * 6.0 * 480 / 256, count_num=12)
    # 9 frames → 8 pairs, count_num = round(2.25) = 2; thres = 1.5 px at 64 × 64
    flows = torch.zeros(2, 8, 2, 64, 64)
    flows[0, :2, 0] = 2.0   # two pairs above: dynamic
    flows[1, :1, 0] = 2.0   # one pair above: not dynamic
    flows[1, 1:, 0] = 1.4   # the rest just below
    result = dynamic_degree(torch.zeros(2, 9, 3, 64, 64), flows=flows)
    assert result['is_dynamic'] == [True, False] and result['count_num'] == 2 and result['thres'] == 1.5
    # 24 fps: every 3rd frame is kept (VBench's interval = round(fps / 8))
    result = dynamic_degree(torch.zeros(1, 25, 3, 64, 64), fps=24.0)
    assert len(result['pair_scores'][0]) == 8


def test_top_fraction_magnitude():
    flows = torch.zeros(1, 2, 10, 10)
    flows[0, 0, 0, :5] = 3.0   # 5 of 100 pixels move by 3 px: exactly the top 5 %
    flows[0, 1, 0, :5] = 4.0
    assert float(top_fraction_magnitude(flows[None])) == pytest.approx(5.0)


def test_forward_backward_check():
    zero = torch.zeros(1, 2, 8, 8)
    assert forward_backward_valid(zero, zero).all()
    forward = torch.zeros(1, 2, 8, 8)
    forward[:, 0] = 2.0
    assert forward_backward_valid(forward, -forward)[0, :, :6].all()      # consistent round trip
    assert not forward_backward_valid(forward, -forward)[0, :, 7].any()   # lands outside the frame
    assert not forward_backward_valid(forward, forward)[0, :, :6].any()   # the backward flow disagrees


def test_metrics_use_raft_when_given(tmp_path):
    from torchvision.models.optical_flow import raft_small
    torch.manual_seed(0)
    path = osp.join(tmp_path, raft_weight_file_name('small'))
    torch.save(raft_small(weights=None).state_dict(), path)
    raft = RAFTFlow('small', weights_path=path, num_flow_updates=2)
    video = synthetic_video('translate', frames=3)
    m = motion_metrics(video, raft)
    assert m['estimator'].startswith('RAFTFlow(raft_small') and math.isfinite(m['warping_error'])
    m_cfg = motion_metrics(video, dict(type='RAFTFlow', variant='small', weights_path=path, num_flow_updates=2))
    assert m_cfg == m
    assert motion_metrics(video, LucasKanadeFlow(levels=2))['estimator'].startswith('LucasKanadeFlow(levels=2')


class CountingLucasKanade(LucasKanadeFlow):
    """The weight-free estimator, counting the frame pairs it computes flow for."""

    def __init__(self):
        super().__init__()
        self.pairs = 0

    def flow_pairs(self, first, second):
        self.pairs += first.shape[0]
        return super().flow_pairs(first, second)


@pytest.mark.parametrize('fps', [8.0, 16.0])
def test_motion_metrics_equal_the_separate_metrics_and_share_the_forward_flow(fps):
    """At 8 fps the forward flows serve both metrics (computed once: 2 flows per pair, not 3); the numbers are
    those of the two metrics computed separately, at 8 fps and when VBench subsamples (16 fps: 3 flows)."""
    videos = torch.cat([synthetic_video('translate', frames=5), synthetic_video('flicker', frames=5)])
    estimator = CountingLucasKanade()
    combined = motion_metrics(videos, estimator, fps=fps)
    pairs = 2 * 4
    assert estimator.pairs == (2 * pairs if fps == 8.0 else 2 * pairs + 2 * 2)
    dyn, warp_err = dynamic_degree(videos, LucasKanadeFlow(), fps=fps), warping_error(videos, LucasKanadeFlow())
    assert combined['dynamic_degree'] == dyn['dynamic_degree']
    assert combined['motion_magnitude'] == dyn['motion_magnitude']
    assert combined['warping_error'] == warp_err['warping_error']
    assert combined['valid_fraction'] == warp_err['valid_fraction']
