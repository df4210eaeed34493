"""Task registry: a source sample → the VCU pixels ``F``, ``M`` and references.

The VDOT paper (Table 1, after VACE) writes every creation task as a Video
Condition Unit ``V = [T; F; M]``; UVCBench has 8 single-condition and 10
composite tasks (§5.2). Each builder below returns a :class:`VCUPixels` with

* ``frames`` F: uint8 ``[T, H, W, 3]`` plus ``missing`` (bool ``[T, H, W]`` or
  ``[T]``) — missing pixels are VACE grey 127.5 (0 in [-1, 1]);
* ``masks`` M: bool ``[T, H, W]``, or ``[T]`` when constant within each frame
  (saves the workers a clip-sized array), True (1) = generate, False (0) = keep;
* ``ref_images``: float ``[3, n_ref, H, W]`` in [-1, 1] or None; the encoder
  prepends them in time with zero masks (docs/DESIGN.md §4).

=========================  ===========================================  ==========================
task                        F                                            M
=========================  ===========================================  ==========================
``t2v``                     grey × n                                     1 × n
``reference`` (R2V)         refs r_1..r_l (prepended), grey × n          (0 × l), 1 × n
``depth``, ``pose``         condition video from the manifest            1 × n
``flow``                    rendered Farnebäck flow (or manifest)        1 × n
``grey``                    VACE grey 0.114 R + 0.587 G + 0.299 B        1 × n
``scribble``                black lines on white (or manifest)           1 × n
``outpaint`` (MV2V)         video, grey on the border                    1 on the border
``extension`` (MV2V)        video on kept frames, grey elsewhere         0 on kept frames, else 1
``inpaint`` (MV2V)          video, grey inside mask/box                  1 inside mask/box
``firstframe_<c>``          frame 0 of the video, then control c         0 on frame 0, then 1
``reference_<c>``           refs prepended, control c                    (0 × l), 1 × n
=========================  ===========================================  ==========================

with controls ``c`` ∈ {depth, pose, flow, grey, scribble}. The conventions are
VACE's (``vace/annotators/``; docs/DESIGN.md §10): grey ``gray.py``, scribble
``scribble.py``, outpainting borders ``outpainting.py`` (``expand_ratio`` per
side), extension modes ``frameref.py`` (see :mod:`.conditions`). For the MV2V
tasks a mask given in the manifest wins over the derived one.

Options (:data:`DEFAULT_OPTIONS`) come from the dataset config and each
manifest row (the row wins), merged and checked by :func:`merge_options`.
``extension_mode`` is a mode or a ``{mode: weight}`` distribution drawn per
sample with the sample's seeded generator.

The registry is a plain dict (``TASKS``, filled with :func:`register_task`), not
an mmengine registry: builders are functions with one fixed signature
``builder(source, options) -> VCUPixels``, selected by the manifest's task name
per sample, never built from configs. :func:`resolve_task` maps the names used
by VACE (``vace/configs/__init__.py``: ``gray``, ``outpainting``,
``outpainting_inner``, ``frameref``, ``framerefext``, ``firstclip``, ...), the
public VDOT code (``depth_firstframe``, ...) and the tiny demo (``r2v``,
``v2v_gray``, ``mv2v_outpaint``) to these, and refuses, with the reason, VACE
names whose meaning is not a task here (``clipref`` without a mode, the
single-image ``image_depth``/``image_gray``/...).
"""
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from vdot_ext.utils import stable_hash

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
    # outpainting, VACE's names and video defaults (vace/configs/video_preproccess.py):
    expand_ratio=C.VACE_EXPAND_RATIO,    # per side; or {'left': r, 'right': r, 'up': r, 'down': r}
    direction=None,                      # sides; None = VACE's ['left', 'right'] (or the dict's keys)
    outpaint_mode='expand',              # 'expand' (VACE outpainting) | 'inner' (outpainting_inner)
    # extension: a mode, or {mode: weight} drawn per sample (seeded)
    extension_mode='firstclip',
    clip_frames=None,                    # None: (T - 1)/4 + 1
    clip_start=None,                     # randomclip: None = drawn per sample (seeded)
    random_frames=1,                     # randomframes: scattered frames kept (VACE REF_NUM)
    ref_fill=1.0,                        # reference canvas: 1.0 white (VACE), 0.0 grey
    scribble_low=100,                    # Canny thresholds (no scribble_model)
    scribble_high=200,
    scribble_model=None,                 # local VACE scribble weights (netG_A_latest.pth)
    scribble_device='cpu',               # where that network runs ('cuda' is ~100× faster)
    flow_max_side=256,                   # Farnebäck resolution (longer side); None = full
    # retired names: accepted as columns only to refuse them with the migration
    outpaint_ratio=None,
    outpaint_directions=None,
)
RETIRED_OPTIONS = {
    'outpaint_ratio': "was replaced by VACE's 'expand_ratio', which applies to each side "
                      '(the old ratio was split across the two sides of an axis, on a frame of '
                      "fixed size: old r on n sides = expand_ratio r/n with outpaint_mode='inner')",
    'outpaint_directions': "was renamed 'direction' (VACE's name; default ['left', 'right'])",
}


@dataclass
class SourceSample:
    """One sample's inputs at the target size (what the reader produces).

    ``video``: ground truth, uint8 ``[T, H, W, 3]``; ``condition``: a condition
    video from the manifest (depth, pose, or a precomputed grey/scribble/flow/
    source video) or None; ``mask``: bool ``[T, H, W]`` or None; ``ref_images``:
    uint8 ``[h, w, 3]`` images as read (fitted by the builder); ``box`` /
    ``ref_box``: ``(x0, y0, x1, y1)`` in *output* pixels; ``ref_frame``: frame of
    the clip cropped by ``ref_box``; ``rng``: the sample's seeded generator for
    random choices (extension modes; None: seeded by ``sample_id``, :func:`sample_rng`).
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
# 2: VACE grey (BGR2GRAY on RGB), black-on-white scribble, per-side expand_ratio.
CONDITION_VERSION = 2

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
    'depth': ('depth', 'depthmap', 'midas', 'depth_anything', 'depthv2'),
    'pose': ('pose', 'openpose', 'skeleton', 'dwpose', 'pose_body'),
    'flow': ('flow', 'opticalflow', 'optical_flow', 'optflow'),
    'grey': ('grey', 'gray', 'greyscale', 'grayscale', 'colorization', 'colorize', 'colourise',
             'v2v_gray'),
    'scribble': ('scribble', 'sketch', 'canny', 'edge', 'edges', 'lineart'),
}
_ANCHOR_ALIASES = {
    'firstframe': ('firstframe', 'first_frame', 'frame', 'i2v'),
    'reference': ('reference', 'ref', 'r2v', 'refimage', 'ref_image', 'reference_image',
                  'image_reference', 'subject', 'face', 'object'),
}
_SINGLE_ALIASES = {
    't2v': ('t2v', 'text', 'text2video', 'text_to_video'),
    'outpaint': ('outpaint', 'outpainting', 'canvas_outpainting', 'outpaint_canvas', 'expand',
                 'mv2v_outpaint'),
    'inpaint': ('inpaint', 'inpainting', 'inpainting_mask', 'inpainting_bbox'),
    'extension': ('extension', 'extend', 'temporal_extension'),
    'reference': _ANCHOR_ALIASES['reference'],
}
# VACE task names that imply options (vace/configs/video_preproccess.py)
_VACE_OPTION_ALIASES = {
    # video_framerefexp_anno: FrameRefExpandAnnotator, MODE default 'firstframe'
    'frameref': ('extension', dict(extension_mode='firstframe')),
    # video_framerefext_anno: FrameRefExtractAnnotator, default REF_CFG = modes first, last,
    # firstlast, random with equal probabilities, REF_NUM 1
    'framerefext': ('extension', dict(extension_mode=dict(firstframe=1.0, lastframe=1.0,
                                                          firstlastframe=1.0, randomframes=1.0))),
    # video_outpainting_inner_anno: OutpaintingInnerAnnotator
    'outpainting_inner': ('outpaint', dict(outpaint_mode='inner')),
}
_VACE_IMAGE_TASKS = {'image_depth': 'depth', 'image_depthv2': 'depth', 'image_gray': 'grey',
                     'image_grey': 'grey', 'image_pose': 'pose', 'image_scribble': 'scribble',
                     'image_outpainting': 'outpaint', 'image_inpainting': 'inpaint'}
_REFUSED = {
    'clipref': "VACE's 'clipref' (video_cliprefexp_anno) runs FrameRefExpandAnnotator on a clip "
               "and has no usable default mode (its default, 'firstframe', needs an image); name "
               "the mode as the task: 'firstclip', 'lastclip' or 'firstlastclip'",
    'framesref': "'framesref' is not a VACE task; VACE's 'frameref' keeps the first frame "
                 "('firstframe'), a kept clip is 'firstclip'/'lastclip'",
}
_REFUSED.update({
    name: (f"VACE's {name!r} (vace/configs/image_preproccess.py) annotates a single image, not "
           f"a video; for a video use {video!r}" + (f" or 'firstframe_{video}'" if video in CONTROLS
                                                      else ''))
    for name, video in _VACE_IMAGE_TASKS.items()})


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
    table.update(_VACE_OPTION_ALIASES)
    for name in _REFUSED:
        table.pop(name, None)
    return table


_ALIASES = _build_alias_table()


def resolve_task(name: str) -> Tuple[str, dict]:
    """Canonical task name and the options its name implies (e.g.
    ``'lastclip'`` → ``('extension', {'extension_mode': 'lastclip'})``,
    ``'frameref'`` → ``('extension', {'extension_mode': 'firstframe'})``).
    Unknown or refused names raise ``KeyError`` with the reason."""
    key = _normalise(name)
    if key in TASKS:
        return key, {}
    if key in _REFUSED:
        raise KeyError(f'task {name!r}: {_REFUSED[key]}')
    if key in _ALIASES:
        canon, implied = _ALIASES[key]
        return canon, {k: (dict(v) if isinstance(v, dict) else v) for k, v in implied.items()}
    raise KeyError(f'unknown task {name!r}; known tasks: {sorted(TASKS)} (plus aliases such as '
                   "'gray', 'outpainting', 'depth_firstframe', 'lastclip', 'frameref')")


# ------------------------------------------------------------------ options
class TaskOptionError(VCUInputError):
    """A task option with a bad value (``field`` is ``options.<key>``)."""

    def __init__(self, key: str, detail: str):
        super().__init__(detail, None, f'options.{key}')
        self.key, self.detail = key, detail


def _int_or_none(key: str, value, low: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or float(value) != int(value) or int(value) < low:
        raise TaskOptionError(key, f'expected an integer ≥ {low} or null, got {value!r}')
    return int(value)


def _extension_spec(value):
    """A mode name, or a distribution: ``[modes]`` (uniform) / ``{mode: weight}``."""
    key = 'extension_mode'
    if isinstance(value, str):
        mode = _normalise(value).replace('_', '')
        if mode not in C.EXTENSION_MODES:
            raise TaskOptionError(key, f'expected one of {C.EXTENSION_MODES} or a {{mode: weight}} '
                                       f'distribution, got {value!r}')
        return mode
    if isinstance(value, (list, tuple)):
        value = {m: 1.0 for m in value}
    if not isinstance(value, Mapping) or not value:
        raise TaskOptionError(key, f'expected a mode, a list of modes or a {{mode: weight}} '
                                   f'distribution, got {value!r}')
    spec = {}
    for mode, weight in value.items():
        name = _extension_spec(str(mode))
        try:
            w = float(weight)
        except (TypeError, ValueError):
            w = float('nan')
        if not np.isfinite(w) or w < 0:
            raise TaskOptionError(key, f'weight of {mode!r} must be a finite number ≥ 0, got '
                                       f'{weight!r}')
        spec[name] = spec.get(name, 0.0) + w
    total = sum(spec.values())
    if total <= 0:
        raise TaskOptionError(key, f'the weights of {dict(value)} sum to 0')
    return {m: w / total for m, w in spec.items()}


def check_options(options: dict) -> dict:
    """Validate and normalise merged options (every key of ``DEFAULT_OPTIONS``);
    raises :class:`TaskOptionError` naming the option and what was expected."""
    out = dict(options)
    for key, why in RETIRED_OPTIONS.items():
        if out.get(key) is not None:
            raise TaskOptionError(key, f'option {key!r} {why}')
    if out['direction'] is not None:
        try:
            out['direction'] = C.as_sides(out['direction'])
        except (TypeError, ValueError) as exc:
            raise TaskOptionError('direction', str(exc)) from None
    ratio = out['expand_ratio']
    if isinstance(ratio, Mapping):
        ratio = {str(k).lower(): v for k, v in ratio.items()}
    elif isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise TaskOptionError('expand_ratio', f'expected a number or {{side: ratio}}, got {ratio!r}')
    try:
        C.side_ratios(ratio, out['direction'])
    except (TypeError, ValueError) as exc:
        raise TaskOptionError('expand_ratio', str(exc)) from None
    out['expand_ratio'] = dict(ratio) if isinstance(ratio, Mapping) else float(ratio)
    if out['outpaint_mode'] not in C.OUTPAINT_MODES:
        raise TaskOptionError('outpaint_mode', f'expected one of {C.OUTPAINT_MODES}, got '
                                               f"{out['outpaint_mode']!r}")
    out['extension_mode'] = _extension_spec(out['extension_mode'])
    out['clip_frames'] = _int_or_none('clip_frames', out['clip_frames'], 1)
    out['clip_start'] = _int_or_none('clip_start', out['clip_start'], 0)
    for key in ('random_frames', 'scribble_low', 'scribble_high'):
        out[key] = _int_or_none(key, out[key], 0 if key.startswith('scribble') else 1)
        if out[key] is None:
            raise TaskOptionError(key, 'expected an integer, got null')
    model = out['scribble_model']
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise TaskOptionError('scribble_model', f'expected a path to VACE scribble weights or null, '
                                                f'got {model!r}')
    out['flow_max_side'] = _int_or_none('flow_max_side', out['flow_max_side'], 0) or None
    return out


def merge_options(*layers: Optional[dict]) -> dict:
    """``DEFAULT_OPTIONS`` overridden by each layer in turn, checked and normalised
    (:func:`check_options`). Unknown keys raise ``KeyError``."""
    out = dict(DEFAULT_OPTIONS)
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in DEFAULT_OPTIONS:
                raise KeyError(f'unknown task option {key!r}; known: {sorted(DEFAULT_OPTIONS)}')
            out[key] = value
    return check_options(out)


# ------------------------------------------------------------------ helpers
def _all(num_frames: int) -> np.ndarray:
    """Per-frame mask: generate everything."""
    return np.ones(num_frames, bool)


def sample_rng(source: SourceSample) -> np.random.Generator:
    """The sample's generator: ``source.rng`` (the dataset seeds it per sample), or
    one seeded by the sample id, so a sample's random choices never depend on
    global state."""
    if source.rng is not None:
        return source.rng
    return np.random.default_rng(int(stable_hash(['vcu_sample', str(source.sample_id)])[:16], 16))


def _scribble(source: SourceSample, options: dict) -> np.ndarray:
    path = options['scribble_model']
    if path is None:  # weight-free: Canny line art, VACE's polarity
        return C.scribble_video(source.video, int(options['scribble_low']),
                                int(options['scribble_high']))
    try:
        return C.scribble_video_vace(source.video, path, options['scribble_device'])
    except (OSError, ValueError) as exc:
        raise VCUInputError(f'cannot run VACE\'s scribble network: {exc}', source.sample_id,
                            'options.scribble_model', path) from None


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
        return _scribble(source, options)
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
    """Border per side from VACE's ``expand_ratio``/``direction``/``outpaint_mode``
    (:func:`conditions.outpaint_borders`), unless the manifest gives a mask."""
    t, h, w, _ = source.video.shape
    if source.mask is not None:
        return _masked_video('outpaint', source, source.mask)
    try:
        borders = C.outpaint_borders(h, w, options['expand_ratio'], options['direction'],
                                     options['outpaint_mode'])
    except ValueError as exc:
        raise VCUInputError(str(exc), source.sample_id, 'options.expand_ratio/direction') from None
    mask = np.ones((t, h, w), bool)
    mask[:, borders['up']:h - borders['down'], borders['left']:w - borders['right']] = False
    pixels = _masked_video('outpaint', source, mask)
    pixels.info['outpaint_borders'] = borders
    return pixels


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
    """Kept frames of the sample's extension mode (:func:`conditions.extension_kept_frames`);
    a ``{mode: weight}`` option is drawn with the sample's generator, first."""
    t, h, w, _ = source.video.shape
    if source.mask is not None:
        return _masked_video('extension', source, source.mask)
    rng = sample_rng(source)
    mode = C.sample_extension_mode(options['extension_mode'], rng)
    try:
        kept = C.extension_kept_frames(t, mode, options['clip_frames'], options['clip_start'], rng,
                                       options['random_frames'])
    except ValueError as exc:
        raise VCUInputError(str(exc), source.sample_id,
                            'options.extension_mode/clip_frames/clip_start/random_frames') from None
    pixels = VCUPixels('extension', source.video, source.video, ~kept, missing=~kept)
    pixels.info['extension_mode'] = mode
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
    """Build the VCU of ``source`` for ``task`` (a registered name or alias).
    ``options`` are layered over ``DEFAULT_OPTIONS``; the options a task name
    implies (``'lastclip'``, ``'frameref'``, ...) win."""
    try:
        name, implied = resolve_task(task)
    except KeyError as exc:
        raise VCUInputError(str(exc.args[0]), source.sample_id, 'task') from None
    try:
        opts = merge_options(options, implied)
    except TaskOptionError as exc:
        raise VCUInputError(exc.detail, source.sample_id, exc.field) from None
    except KeyError as exc:
        raise VCUInputError(str(exc.args[0]), source.sample_id, 'options') from None
    return TASKS[name].builder(source, opts)


def needs_condition(task: str) -> bool:
    """True when the task's control can only come from the manifest (depth/pose)."""
    spec = TASKS[resolve_task(task)[0]]
    return spec.control in MODEL_MADE_CONTROLS
