"""Task registry: a source sample → the VCU pixels ``F``, ``M`` and references.

The VDOT paper (Table 1, after VACE) writes every creation task as a Video
Condition Unit ``V = [T; F; M]``; UVCBench has 8 single-condition and 10
composite tasks (§5.2). Each builder below returns a :class:`VCUPixels` with

* ``frames`` F: uint8 ``[T, H, W, 3]`` plus ``missing`` (bool ``[T, H, W]`` or
  ``[T]``) — missing pixels are VACE grey 127.5 (0 in [-1, 1]);
* ``masks`` M: bool ``[T, H, W]``, or ``[T]`` when constant within each frame
  (saves the workers a clip-sized array), True (1) = generate, False (0) = keep;
* ``ref_images``: float ``[3, n_ref, H, W]`` in [-1, 1] or None; the encoder
  prepends them in time with zero masks (DESIGN.md §4).

=========================  ===========================================  ==========================
task                        F                                            M
=========================  ===========================================  ==========================
``t2v``                     grey × n                                     1 × n
``reference`` (R2V)         refs r_1..r_l (prepended), grey × n          (0 × l), 1 × n
``depth``, ``pose``         condition video from the manifest            1 × n
``flow``                    rendered Farnebäck flow (or manifest)        1 × n
``grey``                    BT.601 grey-scale video (or manifest)        1 × n
``scribble``                Canny edges (or manifest)                    1 × n
``outpaint`` (MV2V)         video, grey on the border                    1 on the border
``extension`` (MV2V)        video on kept frames, grey elsewhere         0 on kept frames, else 1
``inpaint`` (MV2V)          video, grey inside mask/box                  1 inside mask/box
``firstframe_<c>``          frame 0 of the video, then control c         0 on frame 0, then 1
``reference_<c>``           refs prepended, control c                    (0 × l), 1 × n
=========================  ===========================================  ==========================

with controls ``c`` ∈ {depth, pose, flow, grey, scribble}. ``extension`` modes:
``firstclip``, ``lastclip``, ``randomclip``, ``firstframe``, ``lastframe``,
``firstlastframe`` (see :func:`conditions.extension_kept_frames`). For the MV2V
tasks a mask given in the manifest wins over the derived one.

The registry is a plain dict (``TASKS``, filled with :func:`register_task`), not
an mmengine registry: builders are functions with one fixed signature
``builder(source, options) -> VCUPixels``, selected by the manifest's task name
per sample, never built from configs. :func:`resolve_task` maps the names used
by VACE / the public VDOT code (``gray``, ``outpainting``, ``depth_firstframe``,
``firstclip``, ...) to these.
"""
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import conditions as C
from .video_reader import VCUInputError

logger = logging.getLogger(__name__)

CONTROLS = ('depth', 'pose', 'flow', 'grey', 'scribble')
MODEL_MADE_CONTROLS = ('depth', 'pose')  # need a model offline: read from the manifest
ANCHORS = ('firstframe', 'reference')
SINGLE_TASKS = ('depth', 'pose', 'flow', 'grey', 'scribble', 'reference', 'outpaint', 'extension')
COMPOSITE_TASKS = tuple(f'{a}_{c}' for a in ANCHORS for c in CONTROLS)
UVCBENCH_TASKS = SINGLE_TASKS + COMPOSITE_TASKS  # the 18 tasks of UVCBench
EXTRA_TASKS = ('t2v', 'inpaint')

DEFAULT_OPTIONS = dict(
    outpaint_ratio=0.25,                 # fraction of W (H) generated along each axis
    outpaint_directions=('left', 'right', 'up', 'down'),
    extension_mode='firstclip',
    clip_frames=None,                    # None: (T - 1)/4 + 1
    clip_start=None,                     # randomclip: None = drawn per sample (seeded)
    ref_fill=1.0,                        # reference canvas: 1.0 white (VACE), 0.0 grey
    scribble_low=100,
    scribble_high=200,
    flow_max_side=256,                   # Farnebäck resolution (longer side); None = full
)


@dataclass
class SourceSample:
    """One sample's inputs at the target size (what the reader produces).

    ``video``: ground truth, uint8 ``[T, H, W, 3]``; ``condition``: a condition
    video from the manifest (depth, pose, or a precomputed grey/scribble/flow/
    source video) or None; ``mask``: bool ``[T, H, W]`` or None; ``ref_images``:
    uint8 ``[h, w, 3]`` images as read (fitted by the builder); ``box`` /
    ``ref_box``: ``(x0, y0, x1, y1)`` in *output* pixels; ``ref_frame``: frame of
    the clip cropped by ``ref_box``; ``rng``: per-sample generator (randomclip).
    """
    sample_id: str
    video: np.ndarray
    condition: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    ref_images: Optional[List[np.ndarray]] = None
    box: Optional[Tuple[int, int, int, int]] = None
    ref_box: Optional[Tuple[int, int, int, int]] = None
    ref_frame: int = 0
    rng: Optional[np.random.Generator] = None


@dataclass
class VCUPixels:
    """The VCU of one sample in pixels (see module doc)."""
    task: str
    video: np.ndarray
    frames: np.ndarray
    masks: np.ndarray
    missing: Optional[np.ndarray] = None
    ref_images: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)

    @property
    def num_ref(self) -> int:
        return 0 if self.ref_images is None else int(self.ref_images.shape[1])

    def video_tensor(self, device=None) -> torch.Tensor:
        """float ``[3, T, H, W]`` in [-1, 1]."""
        return C.to_unit_float(self.video, device=device)

    def frames_tensor(self, device=None) -> torch.Tensor:
        """float ``[3, T, H, W]`` in [-1, 1], 0 (grey 127.5) at missing pixels."""
        return C.to_unit_float(self.frames, self.missing, device=device)

    def masks_tensor(self, device=None) -> torch.Tensor:
        """float ``[1, T, H, W]`` in {0, 1}."""
        _, h, w, _ = self.video.shape
        return C.mask_to_float(self.masks, h, w, device=device)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    category: str  # 't2v' | 'r2v' | 'v2v' | 'mv2v' | 'composite'
    builder: Callable[[SourceSample, dict], VCUPixels]
    uses_refs: bool = False
    uses_mask: bool = False
    control: Optional[str] = None


# Bumped whenever a condition's pixels change for the same source and options;
# VCU caches record it in their key, so caches of older conditions are refused.
CONDITION_VERSION = 1

TASKS: Dict[str, TaskSpec] = {}


def register_task(name: str, category: str, uses_refs: bool = False, uses_mask: bool = False,
                  control: Optional[str] = None):
    """Decorator adding ``builder(source, options) -> VCUPixels`` to ``TASKS``."""
    def wrap(builder):
        if name in TASKS:
            raise KeyError(f'task {name!r} is already registered')
        TASKS[name] = TaskSpec(name, category, builder, uses_refs, uses_mask, control)
        return builder
    return wrap


# ------------------------------------------------------------- names/aliases
_CONTROL_ALIASES = {
    'depth': ('depth', 'depthmap', 'midas', 'depth_anything'),
    'pose': ('pose', 'openpose', 'skeleton', 'dwpose'),
    'flow': ('flow', 'opticalflow', 'optical_flow', 'optflow'),
    'grey': ('grey', 'gray', 'greyscale', 'grayscale', 'colorization', 'colorize', 'colourise'),
    'scribble': ('scribble', 'sketch', 'canny', 'edge', 'edges', 'lineart'),
}
_ANCHOR_ALIASES = {
    'firstframe': ('firstframe', 'first_frame', 'frame', 'i2v', 'image'),
    'reference': ('reference', 'ref', 'r2v', 'refimage', 'ref_image', 'reference_image',
                  'image_reference', 'subject', 'face', 'object'),
}
_SINGLE_ALIASES = {
    't2v': ('t2v', 'text', 'text2video', 'text_to_video'),
    'outpaint': ('outpaint', 'outpainting', 'canvas_outpainting', 'outpaint_canvas', 'expand'),
    'inpaint': ('inpaint', 'inpainting'),
    'extension': ('extension', 'extend', 'temporal_extension', 'frameref', 'framesref'),
    'reference': _ANCHOR_ALIASES['reference'],
}


def _normalise(name: str) -> str:
    return re.sub(r'[\s\-+&/,]+', '_', str(name).strip().lower()).strip('_')


def _build_alias_table() -> Dict[str, Tuple[str, dict]]:
    table: Dict[str, Tuple[str, dict]] = {}
    for canon, aliases in _SINGLE_ALIASES.items():
        for a in aliases:
            table[a] = (canon, {})
    for canon, aliases in _CONTROL_ALIASES.items():
        for a in aliases:
            table[a] = (canon, {})
    for mode in C.EXTENSION_MODES:
        for form in (mode, f'extension_{mode}', f'extend_{mode}', f'{mode}_extension',
                     mode.replace('clip', '_clip').replace('frame', '_frame')):
            table.setdefault(form, ('extension', dict(extension_mode=mode)))
    for anchor, anchor_aliases in _ANCHOR_ALIASES.items():
        for control, control_aliases in _CONTROL_ALIASES.items():
            for a in anchor_aliases:
                for c in control_aliases:
                    table[f'{a}_{c}'] = (f'{anchor}_{control}', {})
                    table[f'{c}_{a}'] = (f'{anchor}_{control}', {})
    return table


_ALIASES = _build_alias_table()


def resolve_task(name: str) -> Tuple[str, dict]:
    """Canonical task name and the options its name implies (e.g.
    ``'lastclip'`` → ``('extension', {'extension_mode': 'lastclip'})``).
    Unknown names raise ``KeyError`` listing the tasks."""
    key = _normalise(name)
    if key in TASKS:
        return key, {}
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f'unknown task {name!r}; known tasks: {sorted(TASKS)} (plus aliases such as '
                   "'gray', 'outpainting', 'depth_firstframe', 'lastclip')")


def merge_options(*layers: Optional[dict]) -> dict:
    out = dict(DEFAULT_OPTIONS)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in DEFAULT_OPTIONS:
                raise KeyError(f'unknown task option {key!r}; known: {sorted(DEFAULT_OPTIONS)}')
            out[key] = value
    return out


# ------------------------------------------------------------------ helpers
def _all(num_frames: int) -> np.ndarray:
    """Per-frame mask: generate everything."""
    return np.ones(num_frames, bool)


def control_frames(kind: str, source: SourceSample, options: dict, task: str) -> np.ndarray:
    """The control video of ``kind``: the manifest's condition video if given,
    else derived from the ground truth (grey, scribble, flow); depth and pose
    must come from the manifest."""
    if source.condition is not None:
        return source.condition
    if kind in MODEL_MADE_CONTROLS:
        raise VCUInputError(f'task {task!r} needs a {kind} video made offline by a {kind} model '
                            "(put its path in the manifest column 'condition' / "
                            "'src_video_path'); none given", source.sample_id, 'condition')
    if kind == 'grey':
        return C.grey_video(source.video)
    if kind == 'scribble':
        return C.scribble_video(source.video, int(options['scribble_low']),
                                int(options['scribble_high']))
    if kind == 'flow':
        side = options['flow_max_side']
        return C.flow_video(source.video, None if side in (None, 0) else int(side))
    raise KeyError(f'unknown control {kind!r}')


def reference_images(source: SourceSample, options: dict, task: str) -> torch.Tensor:
    """float ``[3, n_ref, H, W]``: the manifest's images, or the ``ref_box`` crop
    of clip frame ``ref_frame``, each fitted to the canvas (VACE)."""
    _, h, w, _ = source.video.shape
    images = list(source.ref_images or [])
    if not images and source.ref_box is not None:
        if not 0 <= source.ref_frame < source.video.shape[0]:
            raise VCUInputError(f'ref_frame {source.ref_frame} is outside the clip of '
                                f'{source.video.shape[0]} frames', source.sample_id, 'ref_frame')
        try:
            images = [C.crop_box(source.video[source.ref_frame], source.ref_box)]
        except ValueError as exc:
            raise VCUInputError(str(exc), source.sample_id, 'ref_box') from None
    if not images:
        raise VCUInputError(f'task {task!r} needs reference images (column \'ref_images\' / '
                            "'ref_image_path') or a 'ref_box' to crop one from the video; none "
                            'given', source.sample_id, 'ref_images')
    fill = float(options['ref_fill'])
    return torch.stack([C.fit_reference(im, h, w, fill) for im in images], dim=1)


def _ignore_mask(source: SourceSample, task: str) -> None:
    if source.mask is not None:
        # Table 1: this task's mask is fixed; a manifest mask is not used.
        logger.warning(f'sample {source.sample_id}: task {task!r} does not use field \'mask\' '
                       '(its masks are fixed by Table 1); ignoring it')


# ----------------------------------------------------------------- builders
@register_task('t2v', 't2v')
def build_t2v(source: SourceSample, options: dict) -> VCUPixels:
    t, h, w, _ = source.video.shape
    _ignore_mask(source, 't2v')
    # every frame is missing (grey): F's stored pixels are never read, so the
    # video array is reused instead of allocating a clip of zeros
    return VCUPixels('t2v', source.video, source.video, _all(t), missing=np.ones(t, bool))


@register_task('reference', 'r2v', uses_refs=True)
def build_reference(source: SourceSample, options: dict) -> VCUPixels:
    t, h, w, _ = source.video.shape
    _ignore_mask(source, 'reference')
    refs = reference_images(source, options, 'reference')
    return VCUPixels('reference', source.video, source.video, _all(t),  # all missing (t2v)
                     missing=np.ones(t, bool), ref_images=refs)


def _make_control_task(kind: str):
    def build(source: SourceSample, options: dict) -> VCUPixels:
        t, h, w, _ = source.video.shape
        _ignore_mask(source, kind)
        frames = control_frames(kind, source, options, kind)
        return VCUPixels(kind, source.video, frames, _all(t))
    build.__name__ = f'build_{kind}'
    build.__doc__ = f'V2V with a {kind} control: F = control video, M = 1.'
    return build


for _kind in CONTROLS:
    register_task(_kind, 'v2v', control=_kind)(_make_control_task(_kind))


def _masked_video(task: str, source: SourceSample, mask: np.ndarray) -> VCUPixels:
    if mask.shape != source.video.shape[:3]:
        raise VCUInputError(f'mask shape {mask.shape} != video {source.video.shape[:3]}',
                            source.sample_id, 'mask')
    base = source.condition if source.condition is not None else source.video
    return VCUPixels(task, source.video, base, mask, missing=mask)


@register_task('outpaint', 'mv2v', uses_mask=True)
def build_outpaint(source: SourceSample, options: dict) -> VCUPixels:
    t, h, w, _ = source.video.shape
    if source.mask is not None:
        mask = source.mask
    else:
        try:
            mask = C.outpaint_mask(t, h, w, options['outpaint_ratio'], options['outpaint_directions'])
        except ValueError as exc:
            raise VCUInputError(str(exc), source.sample_id, 'outpaint_ratio/outpaint_directions') from None
    return _masked_video('outpaint', source, mask)


@register_task('inpaint', 'mv2v', uses_mask=True)
def build_inpaint(source: SourceSample, options: dict) -> VCUPixels:
    t, h, w, _ = source.video.shape
    if source.mask is not None:
        mask = source.mask
    elif source.box is not None:
        try:
            mask = C.box_mask(t, h, w, source.box)
        except ValueError as exc:
            raise VCUInputError(str(exc), source.sample_id, 'box') from None
    else:
        raise VCUInputError("task 'inpaint' needs a mask video/image (column 'mask') or a 'box'",
                            source.sample_id, 'mask')
    return _masked_video('inpaint', source, mask)


@register_task('extension', 'mv2v', uses_mask=True)
def build_extension(source: SourceSample, options: dict) -> VCUPixels:
    t, h, w, _ = source.video.shape
    if source.mask is not None:
        return _masked_video('extension', source, source.mask)
    try:
        kept = C.extension_kept_frames(t, options['extension_mode'], options['clip_frames'],
                                       options['clip_start'], source.rng)
    except ValueError as exc:
        raise VCUInputError(str(exc), source.sample_id, 'extension_mode/clip_frames/clip_start') from None
    pixels = VCUPixels('extension', source.video, source.video, ~kept, missing=~kept)
    pixels.info['kept_frames'] = np.flatnonzero(kept).tolist()
    return pixels


def _make_firstframe_task(kind: str):
    name = f'firstframe_{kind}'

    def build(source: SourceSample, options: dict) -> VCUPixels:
        t, h, w, _ = source.video.shape
        _ignore_mask(source, name)
        frames = control_frames(kind, source, options, name).copy()
        frames[0] = source.video[0]
        masks = _all(t)
        masks[0] = False
        return VCUPixels(name, source.video, frames, masks)
    build.__name__ = f'build_{name}'
    build.__doc__ = f'First frame + {kind}: F = [u_1, c_2..c_n], M = [0, 1..1].'
    return build


def _make_reference_task(kind: str):
    name = f'reference_{kind}'

    def build(source: SourceSample, options: dict) -> VCUPixels:
        t, h, w, _ = source.video.shape
        _ignore_mask(source, name)
        frames = control_frames(kind, source, options, name)
        refs = reference_images(source, options, name)
        return VCUPixels(name, source.video, frames, _all(t), ref_images=refs)
    build.__name__ = f'build_{name}'
    build.__doc__ = f'Reference + {kind}: refs prepended, F = control, M = 1.'
    return build


for _kind in CONTROLS:
    register_task(f'firstframe_{_kind}', 'composite', control=_kind)(_make_firstframe_task(_kind))
    register_task(f'reference_{_kind}', 'composite', uses_refs=True,
                  control=_kind)(_make_reference_task(_kind))


def build_vcu(task: str, source: SourceSample, options: Optional[dict] = None) -> VCUPixels:
    """Build the VCU of ``source`` for ``task`` (a registered name or alias)."""
    try:
        name, implied = resolve_task(task)
    except KeyError as exc:
        raise VCUInputError(str(exc.args[0]), source.sample_id, 'task') from None
    opts = merge_options(options, implied)
    return TASKS[name].builder(source, opts)


def needs_condition(task: str) -> bool:
    """True when the task's control can only come from the manifest (depth/pose)."""
    spec = TASKS[resolve_task(task)[0]]
    return spec.control in MODEL_MADE_CONTROLS
