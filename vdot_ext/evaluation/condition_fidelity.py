"""Per-task condition fidelity: does a generated video keep its VCU condition?

All pixels are in [-1, 1] (data range 2). ``pixels`` is the dict returned by
``SyntheticVideoDataset.get_pixels`` (``frames [3, T, H, W]``, ``masks [1, T, H,
W]``, ``ref_images [3, n_ref, H, W]`` or None, optionally ``scene``). Task names
are those of :mod:`vdot_ext.patches.tasks` or any alias (the demo's ``r2v``,
``v2v_gray``, ``mv2v_outpaint`` included).

=========================  ===================================================================
task                       metric
=========================  ===================================================================
outpaint, extension,       ``kept_psnr``: PSNR over the kept region (mask 0) against the
inpaint (MV2V)             source frames — the pixels the model was told to keep.
grey                       ``luma_psnr``: PSNR of the video's grey in VACE's formula
                           (``Y = 0.114 R + 0.587 G + 0.299 B``, ``vace/annotators/gray.py``
                           applies ``COLOR_BGR2GRAY`` to RGB) against the grey control.
reference (R2V)            ``ref_colour_presence`` ∈ [0, 1]: colour-histogram intersection of
                           the reference object with each frame, the frame's counts scaled to
                           the object's pixel count (8 bins per channel); 1 when every frame
                           holds at least as many pixels of each of the object's colours as the
                           reference object has, 0 when none of its colours appear. Averaged
                           over frames. The object is the reference's pixels that differ from
                           its background (white, VACE's), minus their 1-px rim (anti-aliased
                           blends with the background).
t2v                        ``caption_colour_fraction``: fraction of pixels within RGB distance
                           0.2 (on [0, 1] values) of the caption's object colour, averaged over
                           frames (needs ``pixels['scene']``; otherwise no metric). Compare
                           with the value of the real video.
=========================  ===================================================================
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from vdot_ext.patches.conditions import VACE_GREY_WEIGHTS

HIST_BINS = 8
COLOUR_RADIUS = 0.2
SUPPORTED = ('t2v', 'reference', 'grey', 'outpaint', 'extension', 'inpaint')


def psnr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None,
         data_range: float = 2.0) -> float:
    """PSNR = 10·log10(range² / MSE) in dB (``inf`` when MSE = 0).

    ``mask`` (broadcastable to ``a``) selects the elements with mask > 0.5; the
    MSE is their mean. Computed in float64.
    """
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f'psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}')
    sq = (a - b)**2
    if mask is not None:
        keep = torch.broadcast_to(torch.as_tensor(mask) > 0.5, sq.shape)
        if not bool(keep.any()):
            raise ValueError('psnr: the mask selects no element')
        sq = sq[keep]
    mse = float(sq.mean())
    if mse == 0.0:
        return float('inf')
    return 10.0 * math.log10(data_range**2 / mse)


def vace_grey(video: torch.Tensor) -> torch.Tensor:
    """[3, ...] → [1, ...] grey ``0.114 R + 0.587 G + 0.299 B`` (VACE's, see the module
    table; the weights sum to 1, so it holds on [-1, 1] values), float64."""
    w = torch.tensor(VACE_GREY_WEIGHTS, dtype=torch.float64)
    return torch.einsum('c...,c->...', video.double(), w).unsqueeze(0)


def _colour_histogram(rgb01: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Counts of [N, 3] colours in [0, 1] over bins³ cells."""
    idx = (rgb01.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    return torch.bincount(flat, minlength=bins**3).double()


def reference_colour_presence(video: torch.Tensor, ref_images: torch.Tensor,
                              bins: int = HIST_BINS, background: float = 1.0) -> float:
    """See the module table (reference). ``ref_images [3, n_ref, H, W]``, the object
    on a plain ``background`` (1.0 = white, VACE's; 0.0 = grey)."""
    ref = ref_images.double()
    is_object = ((ref - background).abs() > 1e-3).any(dim=0)  # [n_ref, H, W]
    # drop the 1-px rim: its colours are blends with the background, absent from videos
    interior = -F.max_pool2d(-is_object.double()[:, None], 3, 1, 1)[:, 0] > 0.5
    if not bool(interior.any()):
        raise ValueError(f'reference_colour_presence: the reference image is all background '
                         f'({background}), no object')
    object_pixels = ref.permute(1, 2, 3, 0)[interior]  # [N, 3]
    n_obj = object_pixels.shape[0] / ref_images.shape[1]  # object pixels per reference
    ref_hist = _colour_histogram((object_pixels + 1) / 2, bins)
    ref_hist = ref_hist / ref_hist.sum()
    scores = []
    for t in range(video.shape[1]):
        frame = video[:, t].double().permute(1, 2, 0).reshape(-1, 3)
        frame_hist = _colour_histogram((frame + 1) / 2, bins) / n_obj
        scores.append(float(torch.minimum(ref_hist, frame_hist).sum()))
    return sum(scores) / len(scores)


def caption_colour_fraction(video: torch.Tensor, colour_rgb01, radius: float = COLOUR_RADIUS) -> float:
    """Mean over frames of the fraction of pixels within ``radius`` of a colour."""
    target = torch.tensor(colour_rgb01, dtype=torch.float64).view(3, 1, 1, 1)
    dist = (((video.double() + 1) / 2 - target)**2).sum(dim=0).sqrt()  # [T, H, W]
    return float((dist <= radius).double().mean())


def _check(video: torch.Tensor, pixels: dict) -> None:
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f'condition_fidelity.video: expected [3, T, H, W] in [-1, 1], got {shape}')
    frames = pixels.get('frames')
    if frames is not None and tuple(frames.shape[1:]) != tuple(video.shape[1:]):
        raise ValueError(f'condition_fidelity: video [T, H, W]={tuple(video.shape[1:])} differs from '
                         f"pixels['frames'] {tuple(frames.shape[1:])}")


def _canonical(task: str) -> str:
    from vdot_ext.patches.tasks import resolve_task
    try:
        name = resolve_task(task)[0]
    except KeyError as exc:
        raise ValueError(f'condition_fidelity: {exc.args[0]}') from None
    if name not in SUPPORTED:
        raise ValueError(f'condition_fidelity: unknown task {task!r} ({name}): no metric; supported '
                         f'tasks: {SUPPORTED} and their aliases')
    return name


def condition_fidelity(task: str, video: torch.Tensor, pixels: dict) -> Dict[str, float]:
    """Condition-fidelity metrics of ``video`` for ``task`` (see the module table)."""
    _check(video, pixels)
    name = _canonical(task)
    if name in ('outpaint', 'extension', 'inpaint'):
        kept = pixels['masks'] < 0.5  # [1, T, H, W], broadcast over RGB
        return {'kept_psnr': psnr(video, pixels['frames'], mask=kept)}
    if name == 'grey':
        control = pixels['frames'][:1]  # the grey control replicated to 3 channels
        return {'luma_psnr': psnr(vace_grey(video), control)}
    if name == 'reference':
        if pixels.get('ref_images') is None:
            raise ValueError(f"condition_fidelity({task!r}): pixels['ref_images'] is None")
        return {'ref_colour_presence': reference_colour_presence(video, pixels['ref_images'])}
    scene = pixels.get('scene')  # t2v
    if not scene:
        return {}
    from vdot_ext.data.synthetic_videos import COLOURS
    return {'caption_colour_fraction': caption_colour_fraction(video, COLOURS[scene['colour']])}
