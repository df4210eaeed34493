"""Motion metrics for the MoGAN recipe: dynamics degree and warping error (docs/DESIGN.md §13).

Both metrics read optical flow from an :class:`~vdot_ext.models.optical_flow.OpticalFlowEstimator`.
The default is the weight-free :class:`~vdot_ext.models.optical_flow.LucasKanadeFlow`; pass a
``RAFTFlow`` (or ``dict(type='RAFTFlow', weights_path=...)``) to compute the same metrics with
RAFT, as VBench does. The estimator's name is returned with the numbers, so results computed with
different estimators are never mixed up.

Videos are [B, T, 3, H, W] in [-1, 1].

**Dynamics degree** (VBench, Huang et al. 2024, ``vbench/dynamic_degree.py``). For each pair of
consecutive frames (subsampled to about 8 fps), the score is the mean of the largest 5 % of the
flow magnitudes ``‖o_t(p)‖₂``. A video is *dynamic* when at least ``count_num`` pairs score above
``thres``::

    thres     = max(1, 8 / fps) · 6 · min(H, W) / 256          pixels
    count_num = round(4 · n_frames / 16)                       n_frames after subsampling

The dynamics degree of a set of videos is the fraction that is dynamic. Because the binary decision
is coarse on a handful of tiny videos, we also report ``motion_magnitude`` = the mean pair score
divided by ``thres`` (1.0 = exactly at VBench's threshold).

**Warping error** (temporal consistency; Lai et al. 2018, *Learning Blind Video Temporal
Consistency*). Frame t+1 is warped back to frame t with the forward flow ``f = F(x_t, x_{t+1})``,
``x̃_t(p) = x_{t+1}(p + f(p))``. Occluded pixels are left out by the forward–backward check
(Sundaram et al. 2010) with the backward flow ``b = F(x_{t+1}, x_t)``::

    valid(p)  ⇔  ‖f(p) + b(p + f(p))‖² < α(‖f(p)‖² + ‖b(p + f(p))‖²) + β,   α = 0.01, β = 0.5
                 and p + f(p) lies inside the frame
    E_warp    = Σ_{t,p} valid · mean_c (x_t − x̃_t)² / Σ_{t,p} valid          RGB in [0, 1]

Lower is more consistent. A static video has E_warp ≈ 0; a uniformly translating one stays small
(only interpolation error); brightness flicker is not explained by any flow and gives a large
error. ``valid_fraction`` reports how many pixels were kept.
"""
from typing import Dict, List, Optional, Union

import torch

from vdot_ext.models.optical_flow import OpticalFlowEstimator, build_flow_estimator, check_video, warp

EstimatorLike = Union[None, dict, OpticalFlowEstimator]


def top_fraction_magnitude(flows: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Mean of the largest ``fraction`` of ‖o(p)‖₂ per flow field: [..., 2, H, W] → [...].

    VBench: ``cut_index = int(h·w·0.05)`` values (at least one here, where VBench would average
    an empty slice).
    """
    magnitude = torch.linalg.vector_norm(flows.float(), dim=-3).flatten(-2)
    count = max(1, int(magnitude.shape[-1] * fraction))
    return magnitude.topk(count, dim=-1).values.mean(dim=-1)


def vbench_dynamic_params(height: int, width: int, num_frames: int, fps: float = 8.0) -> Dict[str, float]:
    """VBench's ``set_params``: ``thres`` (pixels) and ``count_num`` for a clip of ``num_frames``
    frames (after subsampling) recorded at ``fps``."""
    factor = max(1.0, 8.0 / fps)
    return dict(thres=factor * 6.0 * (min(height, width) / 256.0), count_num=round(4 * (num_frames / 16.0)))


def subsample_to_8fps(video: torch.Tensor, fps: float) -> torch.Tensor:
    """VBench keeps every ``max(1, round(fps / 8))``-th frame."""
    interval = max(1, round(fps / 8.0))
    return video[:, ::interval]


@torch.no_grad()
def dynamic_degree(videos: torch.Tensor, estimator: EstimatorLike = None, fps: float = 8.0,
                   flows: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """VBench dynamics degree of [B, T, 3, H, W] videos (see the module docstring).

    ``flows`` [B, T'−1, 2, H, W] of the subsampled videos may be given to avoid recomputing them.
    Returns ``dynamic_degree`` (fraction of dynamic videos), ``motion_magnitude`` (mean pair score /
    thres), per-video ``is_dynamic`` and ``pair_scores``, ``thres``, ``count_num``, ``estimator``.
    """
    check_video(videos, 'dynamic_degree')
    estimator = build_flow_estimator(estimator)
    clips = subsample_to_8fps(videos, fps)
    check_video(clips, 'dynamic_degree (after subsampling to 8 fps)')
    if flows is None:
        flows = estimator(clips)
    params = vbench_dynamic_params(clips.shape[-2], clips.shape[-1], clips.shape[1], fps)
    scores = top_fraction_magnitude(flows)                          # [B, T'−1]
    counts = (scores > params['thres']).sum(dim=1)
    is_dynamic = counts >= params['count_num']
    return dict(dynamic_degree=float(is_dynamic.float().mean()),
                motion_magnitude=float(scores.mean() / params['thres']),
                is_dynamic=is_dynamic.tolist(), pair_scores=scores.tolist(),
                thres=params['thres'], count_num=params['count_num'], estimator=estimator.name)


def forward_backward_valid(forward: torch.Tensor, backward: torch.Tensor, alpha: float = 0.01,
                           beta: float = 0.5) -> torch.Tensor:
    """Non-occlusion mask [N, H, W] from forward/backward flows [N, 2, H, W] (Sundaram et al. 2010):
    consistent round trip and a target inside the frame."""
    backward_at_target = warp(backward, forward)
    round_trip = (forward + backward_at_target).square().sum(dim=1)
    bound = alpha * (forward.square().sum(dim=1) + backward_at_target.square().sum(dim=1)) + beta
    h, w = forward.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=forward.dtype, device=forward.device),
                            torch.arange(w, dtype=forward.dtype, device=forward.device), indexing='ij')
    x, y = xs + forward[:, 0], ys + forward[:, 1]
    # inside the frame's pixel area (pixel centres 0 … w−1, each half a pixel wide)
    inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    return (round_trip < bound) & inside


@torch.no_grad()
def warping_error(videos: torch.Tensor, estimator: EstimatorLike = None, alpha: float = 0.01,
                  beta: float = 0.5, forward: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Warping error of [B, T, 3, H, W] videos in [-1, 1] (see the module docstring).

    ``forward`` [B, T−1, 2, H, W], the videos' flows by ``estimator``, may be given to avoid recomputing them.
    Returns ``warping_error`` (mean over videos), per-video ``per_video``, ``valid_fraction`` and
    ``estimator``.
    """
    check_video(videos, 'warping_error')
    estimator = build_flow_estimator(estimator)
    b, t, c, h, w = videos.shape
    first = videos[:, :-1].reshape(-1, c, h, w).float()
    second = videos[:, 1:].reshape(-1, c, h, w).float()
    if forward is None:
        forward = estimator.flow_pairs(first, second).float()
    else:
        forward = forward.reshape(-1, 2, h, w).float()
    backward = estimator.flow_pairs(second, first).float()
    valid = forward_backward_valid(forward, backward, alpha, beta).float()        # [N, H, W]
    warped = warp(second, forward)
    # RGB in [0, 1]: (x/2 + 1/2) differences are half the [-1, 1] ones
    sq_error = (0.5 * (first - warped)).square().mean(dim=1)                     # [N, H, W]
    per_pair_sum = (sq_error * valid).reshape(b, t - 1, -1).sum(dim=(1, 2))
    per_pair_count = valid.reshape(b, t - 1, -1).sum(dim=(1, 2))
    per_video = per_pair_sum / per_pair_count.clamp_min(1.0)
    return dict(warping_error=float(per_video.mean()), per_video=per_video.tolist(),
                valid_fraction=float(valid.mean()), estimator=estimator.name)


def motion_metrics(videos: torch.Tensor, estimator: EstimatorLike = None, fps: float = 8.0,
                   alpha: float = 0.01, beta: float = 0.5) -> Dict[str, object]:
    """Both metrics with one estimator: ``dynamic_degree``, ``motion_magnitude``, ``warping_error``,
    ``valid_fraction``, ``estimator``, ``num_videos`` (scalars, JSON-ready)."""
    estimator = build_flow_estimator(estimator)
    check_video(videos, 'motion_metrics')
    forward = None
    if subsample_to_8fps(videos, fps).shape[1] == videos.shape[1]:
        # VBench's 8-fps clips are the videos themselves: one forward flow serves both metrics
        forward = estimator(videos.float())
    dyn = dynamic_degree(videos, estimator, fps=fps, flows=forward)
    warp_err = warping_error(videos, estimator, alpha=alpha, beta=beta, forward=forward)
    return dict(dynamic_degree=dyn['dynamic_degree'], motion_magnitude=dyn['motion_magnitude'],
                warping_error=warp_err['warping_error'], valid_fraction=warp_err['valid_fraction'],
                estimator=estimator.name, num_videos=int(videos.shape[0]))


def summarize(runs: List[Dict[str, object]], keys=('dynamic_degree', 'motion_magnitude',
                                                    'warping_error')) -> Dict[str, Dict[str, float]]:
    """Mean and sample std (n − 1) of each metric over runs (e.g. seeds), for a results table."""
    out = {}
    for key in keys:
        values = torch.tensor([float(run[key]) for run in runs], dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 0.0
        out[key] = dict(mean=float(values.mean()), std=std, n=len(values))
    return out
