"""Conditions derived from the ground-truth video, as VACE's annotators make them.

All functions take/return ``uint8`` ``[T, H, W, 3]`` RGB arrays at the target
size (what :mod:`vdot_ext.patches.video_reader` produces) or ``bool``
``[T, H, W]`` masks (True = generate, VACE's mask 1). Where a pixel is
*missing* (VACE grey 127.5, i.e. 0 in [-1, 1]) is a separate boolean array,
because 127.5 is not a uint8 value; the float conversion writes 0 there.
Each convention follows a file of VACE's preprocessing code (ali-vilab/VACE,
``vace/annotators/``), docs/DESIGN.md §10:

* grey (``gray.py``): VACE's ``GrayAnnotator`` runs ``cv2.COLOR_BGR2GRAY`` on the
  RGB frames it reads (``utils.read_video_frames`` flips BGR to RGB first), so its
  grey is ``Y = 0.114 R + 0.587 G + 0.299 B`` — BT.601 with the red and blue
  weights swapped (pure red → 29, pure blue → 76; BT.601 gives 76 and 29). The
  released VACE weights were trained on that grey, so we compute exactly it
  (OpenCV's fixed point), replicated to 3 channels.
* scribble (``scribble.py``): black lines on a white background, the polarity of
  VACE's ``ScribbleAnnotator`` (a line-drawing network whose sigmoid output is
  1 = white paper). Without weights we draw Canny edges (OpenCV, Canny 1986) of
  the BT.601 luma after a 3×3 Gaussian blur as black 0 on white 255; with a local
  copy of VACE's network weights (``netG_A_latest.pth``) :class:`ScribbleNet` runs
  VACE's network itself.
* optical flow: dense Farnebäck flow (OpenCV ``calcOpticalFlowFarneback``,
  Farnebäck 2003) between consecutive frames, computed at a reduced resolution
  (longer side ``max_side``, default 256: full-size flow costs ~10× more and the
  rendered map is smooth anyway), rendered with the Middlebury colour wheel
  (Baker et al. 2011; the ``flow_viz.flow_to_image`` of RAFT that VACE's
  ``FlowVisAnnotator`` uses: per-frame normalisation by the largest flow
  magnitude, hue = direction, saturation = magnitude), upsampled to the target
  size (bilinear). ``T`` frames give ``T − 1`` flows; the first is repeated so the
  condition has ``T`` frames, as VACE's ``FlowVisAnnotator`` does.
* outpainting (``outpainting.py``): VACE's ``expand_ratio`` is per side; see
  :func:`outpaint_borders` for its two annotators (``expand``, ``inner``).
* temporal extension (``frameref.py``): the kept frames of each mode, see
  :func:`extension_kept_frames`.
* box/mask inpainting: masks and kept/missing pixels (Table 1 of the VDOT paper,
  MV2V rows).
* reference images: VACE's ``prepare_source`` fit — scale by
  ``min(H/h, W/w)`` (bilinear, ``align_corners=False``), centre on a white canvas
  (1.0 in [-1, 1]).
"""
import threading
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vdot_ext.utils import assert_finite_state_dict, load_tensor_file

OUTPAINT_SIDES = ('left', 'right', 'up', 'down')
OUTPAINT_DIRECTIONS = OUTPAINT_SIDES  # the sides VACE's ``direction`` may name
# vace/configs/video_preproccess.py, video_outpainting_anno.INPUTS
VACE_OUTPAINT_DIRECTION = ('left', 'right')
VACE_EXPAND_RATIO = 0.25
OUTPAINT_MODES = ('expand', 'inner')  # VACE 'outpainting', 'outpainting_inner'
EXTENSION_MODES = ('firstclip', 'lastclip', 'firstlastclip', 'randomclip', 'firstframe',
                   'lastframe', 'firstlastframe', 'randomframes')
RANDOM_EXTENSION_MODES = ('randomclip', 'randomframes')
# VACE's grey: cv2.COLOR_BGR2GRAY applied to RGB, i.e. (R, G, B) weights
VACE_GREY_WEIGHTS = (0.114, 0.587, 0.299)


# --------------------------------------------------------------------- V2V
def _cvt_clip(frames: np.ndarray, code: int) -> np.ndarray:
    """uint8 ``[T, H, W]`` from one OpenCV colour conversion over the clip seen as
    a tall image (a per-pixel map, so stacking frames changes nothing)."""
    import cv2
    t, h, w, _ = frames.shape
    return cv2.cvtColor(np.ascontiguousarray(frames).reshape(t * h, w, 3), code).reshape(t, h, w)


def _luma_clip(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (our edge and flow input)."""
    import cv2
    return _cvt_clip(frames, cv2.COLOR_RGB2GRAY)


def vace_grey_clip(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W]``: VACE's grey ``0.114 R + 0.587 G + 0.299 B``.

    ``vace/annotators/gray.py`` applies ``cv2.COLOR_BGR2GRAY`` to RGB frames;
    OpenCV's fixed point is ``(1868·c0 + 9617·c1 + 4899·c2 + 2¹³) >> 14`` with
    channel 0 = R here, so the same call on our RGB frames reproduces it bit for bit.
    """
    import cv2
    return _cvt_clip(frames, cv2.COLOR_BGR2GRAY)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def grey_video(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` RGB → VACE's grey (:func:`vace_grey_clip`), 3 channels."""
    return _grey_to_rgb(vace_grey_clip(frames))


def scribble_video(frames: np.ndarray, low_threshold: int = 100, high_threshold: int = 200,
                   blur: int = 3) -> np.ndarray:
    """Canny line art in VACE's polarity: black lines (0) on white (255), 3 channels."""
    import cv2
    luma = _luma_clip(frames)
    edges = np.empty_like(luma)
    for t in range(luma.shape[0]):  # per frame: blur and Canny look at neighbours
        y = cv2.GaussianBlur(luma[t], (blur, blur), 0) if blur else luma[t]
        edges[t] = cv2.Canny(y, low_threshold, high_threshold)
    return _grey_to_rgb(255 - edges)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True), nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.conv_block(x)


class ScribbleNet(nn.Module):
    """VACE's scribble network (``vace/annotators/scribble.py``, ``ContourInference``,
    the line-drawing generator of Chan et al. 2022), written here with the same
    module layout so VACE's ``netG_A_latest.pth`` loads with ``strict=True``.

    7×7 conv (``width``) → two stride-2 convs (×2 channels each) → ``num_blocks``
    residual blocks → two stride-2 transposed convs → 7×7 conv to 1 channel →
    sigmoid. Instance norm without affine parameters everywhere, as VACE's.
    VACE's weights: ``width`` 64, 3 residual blocks (``N_RESIDUAL_BLOCKS``).
    """

    def __init__(self, width: int = 64, num_blocks: int = 3, in_channels: int = 3):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(in_channels, width, 7),
                                    nn.InstanceNorm2d(width), nn.ReLU(inplace=True))
        down = []
        for c in (width, 2 * width):
            down += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c),
                     nn.ReLU(inplace=True)]
        self.model1 = nn.Sequential(*down)
        self.model2 = nn.Sequential(*[_ResidualBlock(4 * width) for _ in range(num_blocks)])
        up = []
        for c in (4 * width, 2 * width):
            up += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.InstanceNorm2d(c // 2), nn.ReLU(inplace=True)]
        self.model3 = nn.Sequential(*up)
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] → ``[B, 1, H, W]`` in [0, 1] (1 = white paper)."""
        for part in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = part(x)
        return x

    @classmethod
    def from_file(cls, path: str) -> 'ScribbleNet':
        """Load VACE's weights (a state dict, ``.pth`` or ``.safetensors``) safely; the
        width and block count are read from the tensors."""
        state = load_tensor_file(path, field='scribble_model')
        if 'model0.1.weight' not in state:
            raise ValueError(f'scribble_model: {path} is not a VACE scribble network state dict '
                             "(no 'model0.1.weight'; expected vace/annotators/scribble.py's "
                             'ContourInference layout)')
        assert_finite_state_dict(state, path, 'scribble_model weights')
        width, in_channels = state['model0.1.weight'].shape[:2]
        blocks = len({k.split('.')[1] for k in state if k.startswith('model2.')})
        net = cls(int(width), blocks, int(in_channels))
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f'scribble_model: {path} does not match VACE\'s scribble network '
                             f'layout: {exc}') from None
        return net.eval().requires_grad_(False)


_SCRIBBLE_NETS: Dict[Tuple[str, float, str], ScribbleNet] = {}
_SCRIBBLE_LOCK = threading.Lock()


def scribble_video_vace(frames: np.ndarray, model_path: str, device: str = 'cpu',
                        batch_frames: int = 4) -> np.ndarray:
    """VACE's scribble annotator on uint8 RGB frames: ``net(rgb / 255)``, output
    ``uint8(clip(255·y, 0, 255))`` (truncated, as VACE's ``astype``), 3 channels.
    The network is loaded once per process and file version."""
    import os
    key = (os.path.abspath(model_path), os.path.getmtime(model_path), str(device))
    with _SCRIBBLE_LOCK:
        net = _SCRIBBLE_NETS.get(key)
        if net is None:
            net = _SCRIBBLE_NETS[key] = ScribbleNet.from_file(model_path).to(device)
    out = np.empty(frames.shape[:3], np.uint8)
    with torch.no_grad():
        for lo in range(0, frames.shape[0], batch_frames):  # instance norm: per frame anyway
            x = torch.from_numpy(np.ascontiguousarray(frames[lo:lo + batch_frames])).to(device)
            y = net(x.permute(0, 3, 1, 2).float().div(255.0))[:, 0]
            out[lo:lo + batch_frames] = (y * 255.0).clamp(0, 255).cpu().numpy().astype(np.uint8)
    return _grey_to_rgb(out)


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
    for y in _luma_clip(frames):
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
Ratio = Union[float, Mapping[str, float]]


def as_sides(direction) -> Tuple[str, ...]:
    """``'left,right'`` / ``['left', 'right']`` → ``('left', 'right')`` (validated)."""
    if isinstance(direction, str):
        direction = [d for d in direction.replace(';', ',').replace(' ', ',').split(',') if d]
    sides = tuple(str(d).strip().lower() for d in direction)
    bad = [d for d in sides if d not in OUTPAINT_SIDES]
    if bad or not sides:
        raise ValueError(f'outpaint direction must be a non-empty subset of {OUTPAINT_SIDES}, '
                         f'got {list(direction)!r}')
    return tuple(s for s in OUTPAINT_SIDES if s in sides)


def side_ratios(expand_ratio: Ratio = VACE_EXPAND_RATIO,
                direction: Optional[Iterable[str]] = None) -> Dict[str, float]:
    """VACE's outpainting arguments → ``{side: ratio}`` for all four sides.

    VACE's form (``outpainting.py``): one ``expand_ratio`` applied to *each* side
    named in ``direction`` (default ``['left', 'right']``, the video config's).
    Per-side form: ``expand_ratio={'left': 0.1, 'up': 0.3}``; the sides are its
    keys with a ratio > 0, and a ``direction`` given with it must name the same sides.
    """
    if isinstance(expand_ratio, Mapping):
        bad = [k for k in expand_ratio if str(k).lower() not in OUTPAINT_SIDES]
        if bad:
            raise ValueError(f'expand_ratio: per-side keys must be in {OUTPAINT_SIDES}, got {bad}')
        ratios = {s: 0.0 for s in OUTPAINT_SIDES}
        ratios.update({str(k).lower(): float(v) for k, v in expand_ratio.items()})
        named = tuple(s for s in OUTPAINT_SIDES if ratios[s] > 0)
        if direction is not None and as_sides(direction) != named:
            raise ValueError(f'direction {list(as_sides(direction))} disagrees with the sides of '
                             f'the per-side expand_ratio {dict(expand_ratio)}; give one of them')
    else:
        sides = as_sides(VACE_OUTPAINT_DIRECTION if direction is None else direction)
        ratios = {s: (float(expand_ratio) if s in sides else 0.0) for s in OUTPAINT_SIDES}
    for side, r in ratios.items():
        if not np.isfinite(r) or r < 0:
            raise ValueError(f'expand_ratio for {side!r} must be a finite number ≥ 0, got {r}')
    if not any(r > 0 for r in ratios.values()):
        raise ValueError(f'expand_ratio {expand_ratio!r} with direction {direction!r} expands no side')
    return ratios


def outpaint_borders(height: int, width: int, expand_ratio: Ratio = VACE_EXPAND_RATIO,
                     direction: Optional[Iterable[str]] = None,
                     mode: str = 'expand') -> Dict[str, int]:
    """Border widths in pixels ``{left, right, up, down}`` of an ``H × W`` frame.

    VACE (``vace/annotators/outpainting.py``) has two annotators:

    * ``expand`` — ``OutpaintingAnnotator`` (task ``outpainting``): a source of
      ``s`` columns gets ``⌊r_left·s⌋`` and ``⌊r_right·s⌋`` grey columns added
      (rows likewise), so the canvas is ``s (1 + r_left + r_right)`` wide; VACE's
      pipeline then scales the canvas to the model size. Our frame is that canvas:
      ``border_left = ⌊W·r_left / (1 + r_left + r_right)⌋`` — e.g. ratio 0.25 on
      left and right of 48 columns: a 32-column source, 8 columns each side.
      Exactly VACE's integers when ``r·s`` is whole, within one pixel otherwise.
    * ``inner`` — ``OutpaintingInnerAnnotator`` (task ``outpainting_inner``): the
      frame keeps its size and ``⌊r·W⌋`` columns per side are greyed.
    """
    if mode not in OUTPAINT_MODES:
        raise ValueError(f'outpaint_mode must be one of {OUTPAINT_MODES}, got {mode!r}')
    r = side_ratios(expand_ratio, direction)
    borders: Dict[str, int] = {}
    for (a, b), size in ((('left', 'right'), int(width)), (('up', 'down'), int(height))):
        for side in (a, b):
            if mode == 'expand':
                exact = size * r[side] / (1.0 + r[a] + r[b])
            else:
                exact = size * r[side]
            borders[side] = int(np.floor(exact + 1e-9))  # ε: 48·0.25/1.5 may land at 7.999…
            if r[side] > 0 and borders[side] < 1:
                raise ValueError(f'expand_ratio {r[side]} gives an empty {side} border at '
                                 f'{height}×{width} ({mode})')
        if borders[a] + borders[b] >= size:
            raise ValueError(f'expand_ratio {r[a]}/{r[b]} ({mode}) leaves no kept {a}-{b} span '
                             f'of the {size}-pixel frame')
    return borders


def outpaint_mask(num_frames: int, height: int, width: int, expand_ratio: Ratio = VACE_EXPAND_RATIO,
                  direction: Optional[Iterable[str]] = None, mode: str = 'expand') -> np.ndarray:
    """bool ``[T, H, W]``, True on the border to generate (:func:`outpaint_borders`)."""
    b = outpaint_borders(height, width, expand_ratio, direction, mode)
    mask = np.ones((num_frames, height, width), bool)
    mask[:, b['up']:height - b['down'], b['left']:width - b['right']] = False
    return mask


def box_mask(num_frames: int, height: int, width: int, box: Sequence[int]) -> np.ndarray:
    """bool ``[T, H, W]``, True inside ``[x0, x1) × [y0, y1)`` (output pixels)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f'box {list(box)} is empty or outside the {width}×{height} frame')
    mask = np.zeros((num_frames, height, width), bool)
    mask[:, y0:y1, x0:x1] = True
    return mask


def sample_extension_mode(spec: Union[str, Mapping[str, float]], rng: np.random.Generator) -> str:
    """A mode name as is; a ``{mode: weight}`` distribution sampled with ``rng``."""
    if isinstance(spec, str):
        return spec
    modes = list(spec)
    weights = np.asarray([float(spec[m]) for m in modes])
    return str(modes[int(rng.choice(len(modes), p=weights / weights.sum()))])


def extension_kept_frames(num_frames: int, mode: str, clip_frames: Optional[int] = None,
                          clip_start: Optional[int] = None,
                          rng: Optional[np.random.Generator] = None,
                          random_frames: int = 1) -> np.ndarray:
    """bool ``[T]``: which frames are given (the rest are generated).

    VACE (``vace/annotators/frameref.py``) builds extension inputs by appending
    or prepending ``expand_num`` grey frames (mask 1) to given frames (mask 0),
    ``FrameRefExpandAnnotator``, or by greying all but some frames of a video,
    ``FrameRefExtractAnnotator``. On a clip of ``T`` frames:

    * ``firstclip`` / ``lastclip``: ``clip_frames`` consecutive frames at the
      start / end (default ``(T − 1)/4 + 1``, e.g. 21 of 81); ``firstlastclip``
      both (VACE's ``frames`` + grey + ``frames_2``);
    * ``firstframe`` / ``lastframe`` / ``firstlastframe``: those frames;
    * ``randomclip`` (ours): ``clip_frames`` *consecutive* frames from
      ``clip_start`` (drawn uniformly from ``[0, T − clip_frames]`` with ``rng``
      when not given);
    * ``randomframes``: ``random_frames`` *scattered* distinct frames drawn with
      ``rng`` — VACE's ``FrameRefExtractAnnotator`` mode ``random``
      (``random.sample(range(T), ref_num)``, ``REF_NUM`` default 1).

    The random modes need ``rng`` (seeded per sample by the caller).
    """
    if mode not in EXTENSION_MODES:
        raise ValueError(f'extension mode must be one of {EXTENSION_MODES}, got {mode!r}')
    if rng is None and (mode == 'randomframes' or (mode == 'randomclip' and clip_start is None)):
        raise ValueError(f'extension mode {mode!r} needs a seeded generator (rng)')
    kept = np.zeros(num_frames, bool)
    if mode.endswith('frame'):
        if mode in ('firstframe', 'firstlastframe'):
            kept[0] = True
        if mode in ('lastframe', 'firstlastframe'):
            kept[-1] = True
        return kept
    if mode == 'randomframes':
        k = int(random_frames)
        if not 1 <= k < num_frames:
            raise ValueError(f'extension random_frames={k} must be in [1, {num_frames - 1}]')
        kept[rng.choice(num_frames, size=k, replace=False)] = True
        return kept
    clip = (num_frames - 1) // 4 + 1 if clip_frames is None else int(clip_frames)
    limit = (num_frames - 1) // 2 if mode == 'firstlastclip' else num_frames - 1
    if not 1 <= clip <= limit:
        raise ValueError(f'extension clip_frames={clip} must be in [1, {limit}] for {mode!r} '
                         f'on {num_frames} frames (at least one frame to generate)')
    if mode == 'firstlastclip':
        kept[:clip] = True
        kept[num_frames - clip:] = True
        return kept
    if mode == 'firstclip':
        start = 0
    elif mode == 'lastclip':
        start = num_frames - clip
    else:
        start = int(rng.integers(0, num_frames - clip + 1)) if clip_start is None else int(clip_start)
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
