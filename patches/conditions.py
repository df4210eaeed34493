"""Conditions derived from the ground-truth video without a model.

All functions take/return ``uint8`` ``[T, H, W, 3]`` RGB arrays at the target
size (what :mod:`vdot_ext.patches.video_reader` produces) or ``bool``
``[T, H, W]`` masks (True = generate, VACE's mask 1). Where a pixel is
*missing* (VACE grey 127.5, i.e. 0 in [-1, 1]) is a separate boolean array,
because 127.5 is not a uint8 value; the float conversion writes 0 there.

* grey-scale: ``Y' = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601) via OpenCV's
  ``COLOR_RGB2GRAY`` (fixed-point, within one uint8 level of the exact formula),
  replicated to 3 channels — what VACE's ``GrayAnnotator`` does (``cv2.cvtColor``
  RGB→GRAY→RGB).
* scribble: Canny edges (OpenCV, Canny 1986) of the grey frame after a 3×3
  Gaussian blur, white lines on black, as VACE's/ControlNet's canny maps. VACE's
  own scribble annotator is a learned line-drawing model; a researcher who has
  such videos puts them in the manifest's ``condition`` column instead.
* optical flow: dense Farnebäck flow (OpenCV ``calcOpticalFlowFarneback``,
  Farnebäck 2003) between consecutive frames, computed at a reduced resolution
  (longer side ``max_side``, default 256: full-size flow costs ~10× more and the
  rendered map is smooth anyway), rendered with the Middlebury colour wheel
  (Baker et al. 2011; the ``flow_viz.flow_to_image`` of RAFT that VACE's
  ``FlowVisAnnotator`` uses: per-frame normalisation by the largest flow
  magnitude, hue = direction, saturation = magnitude), upsampled to the target
  size (bilinear). ``T`` frames give ``T − 1`` flows; the first is repeated so the
  condition has ``T`` frames, as VACE's ``FlowVisAnnotator`` does.
* outpainting, box/mask inpainting, temporal extension, first frame: masks and
  kept/missing pixels (Table 1 of the VDOT paper, MV2V rows).
* reference images: VACE's ``prepare_source`` fit — scale by
  ``min(H/h, W/w)`` (bilinear, ``align_corners=False``), centre on a white canvas
  (1.0 in [-1, 1]).
"""
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

OUTPAINT_DIRECTIONS = ('left', 'right', 'up', 'down')
EXTENSION_MODES = ('firstclip', 'lastclip', 'randomclip', 'firstframe', 'lastframe',
                   'firstlastframe')


# --------------------------------------------------------------------- V2V
def _grey_clip(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W]`` luma: one OpenCV call over the clip seen as a tall image
    (a per-pixel map, so stacking frames changes nothing)."""
    import cv2
    t, h, w, _ = frames.shape
    return cv2.cvtColor(np.ascontiguousarray(frames).reshape(t * h, w, 3),
                        cv2.COLOR_RGB2GRAY).reshape(t, h, w)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    import cv2
    t, h, w = grey.shape
    return cv2.cvtColor(grey.reshape(t * h, w), cv2.COLOR_GRAY2RGB).reshape(t, h, w, 3)


def grey_video(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` RGB → BT.601 luma replicated to 3 channels."""
    return _grey_to_rgb(_grey_clip(frames))


def scribble_video(frames: np.ndarray, low_threshold: int = 100, high_threshold: int = 200,
                   blur: int = 3) -> np.ndarray:
    """Canny edge maps (white 255 on black 0), 3 channels."""
    import cv2
    grey = _grey_clip(frames)
    edges = np.empty_like(grey)
    for t in range(grey.shape[0]):  # per frame: blur and Canny look at neighbours
        y = cv2.GaussianBlur(grey[t], (blur, blur), 0) if blur else grey[t]
        edges[t] = cv2.Canny(y, low_threshold, high_threshold)
    return _grey_to_rgb(edges)


def make_colorwheel() -> np.ndarray:
    """The Middlebury colour wheel, ``[55, 3]`` in [0, 255] (Baker et al. 2011;
    segment lengths RY 15, YG 6, GC 4, CB 11, BM 13, MR 6)."""
    segments = [(15, 0, 1, 'up'), (6, 1, 0, 'down'), (4, 1, 2, 'up'), (11, 2, 1, 'down'),
                (13, 2, 0, 'up'), (6, 0, 2, 'down')]
    # each segment: one channel full (255), one ramps up or down
    wheel = []
    for length, full, ramp, kind in segments:
        block = np.zeros((length, 3))
        block[:, full] = 255
        r = np.floor(255 * np.arange(length) / length)
        block[:, ramp] = r if kind == 'up' else 255 - r
        wheel.append(block)
    return np.concatenate(wheel)


_COLORWHEEL = make_colorwheel()


def flow_to_color(flow: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """float ``[h, w, 2]`` flow (u right, v down) → uint8 ``[h, w, 3]`` RGB.

    Normalised by the largest magnitude of this field, ``ρ = |f| / (max|f| + ε)``;
    angle ``a = atan2(−v, −u)/π`` indexes the wheel (linear between entries);
    colour ``1 − ρ (1 − c)`` inside the unit circle (all of it after
    normalisation), as RAFT's ``flow_viz.flow_uv_to_colors``.
    """
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    rad_max = np.sqrt(u**2 + v**2).max()
    u, v = u / (rad_max + eps), v / (rad_max + eps)
    ncols = _COLORWHEEL.shape[0]
    rad = np.sqrt(u**2 + v**2)
    a = np.arctan2(-v, -u) / np.pi
    fk = (a + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = k0 + 1
    k1[k1 == ncols] = 0
    f = (fk - k0)[..., None]
    col = (1 - f) * _COLORWHEEL[k0] / 255.0 + f * _COLORWHEEL[k1] / 255.0
    inside = (rad <= 1)[..., None]
    col = np.where(inside, 1 - rad[..., None] * (1 - col), col * 0.75)
    return np.floor(255 * col).astype(np.uint8)


def farneback_flows(frames: np.ndarray, max_side: Optional[int] = 256) -> np.ndarray:
    """float32 ``[T − 1, h, w, 2]`` flow from frame t to t + 1 at the reduced size
    (longer side ``max_side``; None = full size), in pixels of that size."""
    import cv2
    t, h, w, _ = frames.shape
    if t < 2:
        raise ValueError(f'optical flow needs ≥ 2 frames, got {t}')
    scale = 1.0 if not max_side else min(1.0, float(max_side) / max(h, w))
    fh, fw = max(8, int(round(h * scale))), max(8, int(round(w * scale)))
    greys = []
    for y in _grey_clip(frames):
        if (fh, fw) != (h, w):
            y = cv2.resize(y, (fw, fh), interpolation=cv2.INTER_AREA)
        greys.append(y)
    flows = np.empty((t - 1, fh, fw, 2), np.float32)
    for k in range(t - 1):
        # OpenCV's documented default parameters for dense Farnebäck flow
        flows[k] = cv2.calcOpticalFlowFarneback(greys[k], greys[k + 1], None, pyr_scale=0.5,
                                                levels=3, winsize=15, iterations=3, poly_n=5,
                                                poly_sigma=1.2, flags=0)
    return flows


def flow_video(frames: np.ndarray, max_side: Optional[int] = 256) -> np.ndarray:
    """Rendered Farnebäck flow, uint8 ``[T, H, W, 3]`` (first flow repeated)."""
    import cv2
    t, h, w, _ = frames.shape
    flows = farneback_flows(frames, max_side)
    out = np.empty_like(frames)
    for k in range(t - 1):
        color = flow_to_color(flows[k])
        if color.shape[:2] != (h, w):
            color = cv2.resize(color, (w, h), interpolation=cv2.INTER_LINEAR)
        out[k + 1] = color
    out[0] = out[1]
    return out


# -------------------------------------------------------------------- masks
def outpaint_mask(num_frames: int, height: int, width: int, ratio: float,
                  directions: Iterable[str] = OUTPAINT_DIRECTIONS) -> np.ndarray:
    """bool ``[T, H, W]``, True on the border to generate.

    ``ratio`` is the fraction of the width (left/right) or height (up/down) to
    generate along each axis that has a direction; it is split evenly between
    the two sides when both are named: one side gets ``round(ratio·W)`` columns,
    both sides ``round(ratio·W/2)`` each (rows likewise).
    """
    directions = [str(d).lower() for d in directions]
    bad = [d for d in directions if d not in OUTPAINT_DIRECTIONS]
    if bad or not directions:
        raise ValueError(f'outpaint directions must be a non-empty subset of '
                         f'{OUTPAINT_DIRECTIONS}, got {directions}')
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f'outpaint ratio must be in (0, 1), got {ratio}')
    mask = np.zeros((num_frames, height, width), bool)
    for axis, (lo, hi), size in ((2, ('left', 'right'), width), (1, ('up', 'down'), height)):
        sides = [s for s in (lo, hi) if s in directions]
        if not sides:
            continue
        border = int(round(ratio * size / len(sides)))
        if border < 1:
            raise ValueError(f'outpaint ratio {ratio} gives an empty border on {sides} at '
                             f'{height}×{width}')
        for side in sides:
            if side == 'left':
                mask[:, :, :border] = True
            elif side == 'right':
                mask[:, :, width - border:] = True
            elif side == 'up':
                mask[:, :border, :] = True
            else:
                mask[:, height - border:, :] = True
    return mask


def box_mask(num_frames: int, height: int, width: int, box: Sequence[int]) -> np.ndarray:
    """bool ``[T, H, W]``, True inside ``[x0, x1) × [y0, y1)`` (output pixels)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f'box {list(box)} is empty or outside the {width}×{height} frame')
    mask = np.zeros((num_frames, height, width), bool)
    mask[:, y0:y1, x0:x1] = True
    return mask


def extension_kept_frames(num_frames: int, mode: str, clip_frames: Optional[int] = None,
                          clip_start: Optional[int] = None,
                          rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """bool ``[T]``: which frames are given (the rest are generated).

    ``firstclip``/``lastclip``/``randomclip`` keep ``clip_frames`` consecutive
    frames (default ``(T − 1)/4 + 1``, e.g. 21 of 81) at the start, the end, or
    from ``clip_start`` (drawn uniformly from ``[0, T − clip_frames]`` with
    ``rng`` when not given); ``firstframe``/``lastframe``/``firstlastframe``
    keep those frames.
    """
    if mode not in EXTENSION_MODES:
        raise ValueError(f'extension mode must be one of {EXTENSION_MODES}, got {mode!r}')
    kept = np.zeros(num_frames, bool)
    if mode.endswith('frame'):
        if mode in ('firstframe', 'firstlastframe'):
            kept[0] = True
        if mode in ('lastframe', 'firstlastframe'):
            kept[-1] = True
        return kept
    clip = (num_frames - 1) // 4 + 1 if clip_frames is None else int(clip_frames)
    if not 1 <= clip < num_frames:
        raise ValueError(f'extension clip_frames={clip} must be in [1, {num_frames - 1}]')
    if mode == 'firstclip':
        start = 0
    elif mode == 'lastclip':
        start = num_frames - clip
    else:
        if clip_start is None:
            rng = rng if rng is not None else np.random.default_rng()
            start = int(rng.integers(0, num_frames - clip + 1))
        else:
            start = int(clip_start)
        if not 0 <= start <= num_frames - clip:
            raise ValueError(f'extension clip_start={start} must be in [0, {num_frames - clip}]')
    kept[start:start + clip] = True
    return kept


# --------------------------------------------------------------- references
def crop_box(frame: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """uint8 ``[h, w, 3]`` crop ``[y0:y1, x0:x1]`` (output pixels)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= frame.shape[1] and 0 <= y0 < y1 <= frame.shape[0]):
        raise ValueError(f'box {list(box)} is empty or outside the '
                         f'{frame.shape[1]}×{frame.shape[0]} frame')
    return np.ascontiguousarray(frame[y0:y1, x0:x1])


def fit_reference(image: np.ndarray, height: int, width: int, fill: float = 1.0) -> torch.Tensor:
    """uint8 ``[h, w, 3]`` → float ``[3, H, W]`` in [-1, 1], VACE's reference fit.

    VACE ``prepare_source``: ``s = min(H/h, W/w)``, size ``(⌊h s⌋, ⌊w s⌋)``,
    bilinear (``align_corners=False``), pasted at ``((H − h')//2, (W − w')//2)``
    on a canvas of ``fill`` (1.0 = white, VACE's choice; 0.0 = grey 127.5).
    """
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    canvas = torch.full((3, height, width), float(fill))
    if (h, w) == (height, width):
        return x
    scale = min(height / h, width / w)
    nh, nw = int(h * scale), int(w * scale)
    resized = F.interpolate(x[None], size=(nh, nw), mode='bilinear', align_corners=False)[0]
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = resized
    return canvas


def to_unit_float(frames: np.ndarray, missing: Optional[np.ndarray] = None,
                  device=None) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` → float ``[3, T, H, W]`` in [-1, 1] (``u8/127.5 − 1``),
    0 (grey 127.5) where ``missing`` (bool ``[T, H, W]`` or ``[T]``) is True.

    The uint8 array is moved to ``device`` first, so on a GPU the 4× larger float
    tensor is only ever made there."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    x = x.permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)
    if missing is not None:
        m = torch.from_numpy(np.ascontiguousarray(missing)).to(x.device)
        if m.ndim == 1:
            x[:, m] = 0.0
        else:
            x.masked_fill_(m[None], 0.0)
    return x


def mask_to_float(mask: np.ndarray, height: Optional[int] = None, width: Optional[int] = None,
                  device=None) -> torch.Tensor:
    """bool ``[T, H, W]`` (or per frame ``[T]``, with ``height``/``width``) →
    float ``[1, T, H, W]`` in {0, 1}."""
    m = torch.from_numpy(np.ascontiguousarray(mask)).to(device)
    if m.ndim == 1:
        m = m[:, None, None].expand(-1, height, width)
    return m.float()[None]


def box_from_value(value, name: str = 'box') -> Tuple[float, float, float, float]:
    """``[x0, y0, x1, y1]`` from a list or an ``'x0,y0,x1,y1'`` string."""
    if isinstance(value, str):
        value = [v for v in value.replace('[', '').replace(']', '').split(',') if v.strip()]
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f'{name}: expected [x0, y0, x1, y1] numbers, got {value!r}') from None
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f'{name}: expected [x0, y0, x1, y1] with x1 > x0 and y1 > y0, '
                         f'got {value!r}')
    return box
