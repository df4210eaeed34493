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
reference (R2V)            ``ref_colour_recall`` ∈ [0, 1]: palette-class recall of the reference
                           object. The object is the reference's pixels that differ from its
                           background (white, VACE's), minus their 1-px rim (blends with the
                           background); ``n_k`` = its pixels of palette class k per reference
                           image. Per frame ``Σ_k min(m_k, n_k) / Σ_k n_k`` with ``m_k`` the
                           frame's pixels of class k (= ``min(1, m_c / n_c)`` for the
                           renderer's one-colour objects), averaged over frames. 1 when every
                           frame shows at least as much of the object's colour as the reference
                           (the renderer draws the object at the same size in both), 0 when
                           none of it appears.
t2v                        ``caption_colour_share``: fraction of pixels of the caption colour's
                           palette class, averaged over frames (needs ``pixels['scene']``;
                           otherwise no metric). Compare with the value of the real video.
=========================  ===================================================================

Palette classes (both colour metrics). A pixel ``x`` (RGB on [0, 1]) belongs to the
palette colour ``c`` (``vdot_ext.data.synthetic_videos.COLOURS``) whose ray ``s·c``
passes nearest: ``s_c = max(0, x·c / c·c)``, ``d_c = |x − s_c·c|``, ``k = argmin_c d_c``;
it is unclassified when ``d_k > MAX_RAY_DISTANCE`` (0.2) or ``s_k < MIN_SCALE`` (0.6),
or when at most half of its 3×3 neighbourhood (the pixels inside the frame, itself
included) has class k.
Why rays and the floor: the renderer draws only scaled palette colours (objects ``c``,
their texture ``0.45 c + 0.05``, backgrounds ``0.75 c`` times a ``0.35 → 1`` ramp), and
a lossy codec mostly darkens and blurs them (the first shipped tiny codec, 22.7 dB: bright objects to
about ``0.8 c``, textures averaged to ``≈ 0.73 c``), which keeps the ray. Exact colour
tests (a radius around ``c``, 8-bin histograms) scored the codec's reconstruction of the
real video at 0.21 (t2v) and 0.04 (R2V) times the real's. The floor sends dark pixels (the texture's dark
half, dark ends of gradients, where all rays meet) and mid grey (0 on [-1, 1]: white's
ray at s = 0.53) to no class. A colour the codec turns into another palette colour's
shade (e.g. orange into dark yellow) is counted as that colour: it is not there. The
majority rule keeps isolated pixels out: uniform noise, which has some pixels near every
ray, scored 0.80 on ``ref_colour_recall`` without it and 0.001 with it (real 1.0).
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from vdot_ext.patches.conditions import VACE_GREY_WEIGHTS

MIN_SCALE = 0.6  # see the module doc: palette classes
MAX_RAY_DISTANCE = 0.2
UNCLASSIFIED = -1
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


def palette() -> Tuple[Tuple[str, ...], torch.Tensor]:
    """(names, colours [K, 3] on [0, 1], float64) of the synthetic renderer's palette."""
    from vdot_ext.data.synthetic_videos import COLOURS
    return tuple(COLOURS), torch.tensor([COLOURS[n] for n in COLOURS], dtype=torch.float64)


def palette_labels(video: torch.Tensor, min_scale: float = MIN_SCALE,
                   max_distance: float = MAX_RAY_DISTANCE) -> torch.Tensor:
    """[3, ..., H, W] in [-1, 1] → [..., H, W] int64: the index in :func:`palette` of each pixel's
    class, ``UNCLASSIFIED`` (−1) for none (see the module doc: palette classes)."""
    _, colours = palette()
    x = ((video.double().clamp(-1, 1) + 1) / 2).movedim(0, -1)  # [..., 3] on [0, 1]
    scale = ((x @ colours.T) / (colours * colours).sum(1)).clamp(min=0)  # s_c = x·c / c·c, [..., K]
    distance = (x[..., None, :] - scale[..., None] * colours).norm(dim=-1)  # |x − s_c·c|
    nearest_distance, labels = distance.min(dim=-1)
    nearest_scale = scale.gather(-1, labels[..., None])[..., 0]
    labels[(nearest_distance > max_distance) | (nearest_scale < min_scale)] = UNCLASSIFIED
    # spatial majority: a class held by at most half of a pixel's 3×3 neighbourhood is noise
    flat = labels.reshape(-1, 1, *labels.shape[-2:])  # [N, 1, H, W]
    coherent = torch.full_like(flat, UNCLASSIFIED)
    for k in range(colours.shape[0]):
        is_k = flat == k
        share = F.avg_pool2d(is_k.double(), 3, 1, 1, count_include_pad=False)  # of in-frame neighbours
        coherent[is_k & (share > 0.5)] = k
    return coherent.reshape(labels.shape)


def _class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels[labels >= 0].flatten(), minlength=num_classes).double()


def reference_colour_recall(video: torch.Tensor, ref_images: torch.Tensor, background: float = 1.0) -> float:
    """See the module table (reference). ``ref_images [3, n_ref, H, W]``, the object on a plain
    ``background`` (1.0 = white, VACE's; 0.0 = grey)."""
    names, _ = palette()
    ref = ref_images.double()
    is_object = ((ref - background).abs() > 1e-3).any(dim=0)  # [n_ref, H, W]
    # drop the 1-px rim: its colours are blends with the background, absent from videos
    interior = -F.max_pool2d(-is_object.double()[:, None], 3, 1, 1)[:, 0] > 0.5
    if not bool(interior.any()):
        raise ValueError(f"reference_colour_recall: pixels['ref_images'] is all background ({background}), "
                         'no object')
    ref_counts = _class_counts(palette_labels(ref)[interior], len(names)) / ref_images.shape[1]  # n_k
    if float(ref_counts.sum()) == 0.0:
        raise ValueError("reference_colour_recall: no pixel of the object in pixels['ref_images'] has a palette "
                         f'colour ({", ".join(names)}; min scale {MIN_SCALE}, ray distance {MAX_RAY_DISTANCE})')
    labels = palette_labels(video)  # [T, H, W]
    recalls = [float(torch.minimum(_class_counts(labels[t], len(names)), ref_counts).sum() / ref_counts.sum())
               for t in range(video.shape[1])]
    return sum(recalls) / len(recalls)


def caption_colour_share(video: torch.Tensor, colour: str) -> float:
    """Mean over frames of the fraction of pixels of palette class ``colour`` (a name in
    :func:`palette`); all frames have the same size, so it is the fraction over the video."""
    names, _ = palette()
    if colour not in names:
        raise ValueError(f"caption_colour_share: colour {colour!r} (pixels['scene']['colour']) is not in the "
                         f'palette {names}')
    return float((palette_labels(video) == names.index(colour)).double().mean())


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
        return {'ref_colour_recall': reference_colour_recall(video, pixels['ref_images'])}
    scene = pixels.get('scene')  # t2v
    if not scene:
        return {}
    return {'caption_colour_share': caption_colour_share(video, scene['colour'])}
