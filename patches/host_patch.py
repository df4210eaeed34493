"""Explicit, version-checked patch of diffsynth: a VACE unit that takes a batch of VCUs.

Why only this: the training data path needs no change to diffsynth —
``VCUManifestDataset`` encodes with :func:`vdot_ext.patches.vcu.encode_vcu` and the
trainer composes the DiT forward itself. What diffsynth cannot do is encode more
than one VCU at a time inside its pipeline: ``WanVideoUnit_VACE.process`` takes
PIL frames of *one* video (``vace_video_mask[0, 0]``, ``vace_reference_image[0]``).
:func:`apply_vace_batch_patch` wraps that method so that, when given tensors as
this data path produces them, it returns the batched ``vace_context``:

* ``vace_video``: ``[B, 3, T, H, W]`` in [-1, 1] (grey 0 = missing),
* ``vace_video_mask``: ``[B, 1, T, H, W]`` in [0, 1] (1 = generate), or None (all 1),
* ``vace_reference_image``: ``[B, 3, n_ref, H, W]`` in [-1, 1], or None.

Any other input (PIL lists, as diffsynth's own callers pass) goes to the
original method unchanged. The rest of ``WanVideoPipeline`` (noise, prompt,
sampling loop) stays batch-1; the patch is for code that runs the unit itself
(evaluation, inspection) and for the equality test against diffsynth.

Nothing is patched on import: call :func:`apply_vace_batch_patch` (idempotent)
and :func:`remove_vace_batch_patch` to restore. The patch checks the installed
diffsynth version and the method's signature and refuses to apply to others.
"""
import functools
import inspect
import logging
from typing import Tuple

import torch

logger = logging.getLogger(__name__)

SUPPORTED_DIFFSYNTH = ('2.1.',)  # the VACE unit was checked against 2.1.12
EXPECTED_PARAMS = ('self', 'pipe', 'vace_video', 'vace_video_mask', 'vace_reference_image',
                   'vace_scale', 'height', 'width', 'num_frames', 'tiled', 'tile_size',
                   'tile_stride')
_PATCH_FLAG = '__vdot_ext_vace_batch_patch__'


def _diffsynth_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version('diffsynth')
    except PackageNotFoundError:
        raise RuntimeError('vdot_ext host patch: diffsynth is not installed') from None


def check_host_version() -> Tuple[str, object]:
    """``(diffsynth version, WanVideoUnit_VACE)``; raises when unsupported."""
    ver = _diffsynth_version()
    if not ver.startswith(SUPPORTED_DIFFSYNTH):
        raise RuntimeError(f'vdot_ext host patch supports diffsynth {SUPPORTED_DIFFSYNTH}*, '
                           f'found {ver}; check WanVideoUnit_VACE.process and update the patch')
    from diffsynth.pipelines.wan_video import WanVideoUnit_VACE
    original = getattr(WanVideoUnit_VACE.process, '__wrapped__', WanVideoUnit_VACE.process)
    params = tuple(inspect.signature(original).parameters)
    if params != EXPECTED_PARAMS:
        raise RuntimeError(f'vdot_ext host patch: diffsynth {ver} WanVideoUnit_VACE.process has '
                           f'parameters {params}, expected {EXPECTED_PARAMS}')
    return ver, WanVideoUnit_VACE


def _is_batched(vace_video, vace_video_mask, vace_reference_image) -> bool:
    given = [x for x in (vace_video, vace_video_mask, vace_reference_image) if x is not None]
    return bool(given) and all(isinstance(x, torch.Tensor) and x.ndim == 5 for x in given)


def apply_vace_batch_patch() -> bool:
    """Wrap ``WanVideoUnit_VACE.process`` (see module doc). Returns True when it
    patched now, False when already patched."""
    ver, unit_cls = check_host_version()
    if getattr(unit_cls.process, _PATCH_FLAG, False):
        return False
    original = unit_cls.process

    @functools.wraps(original)
    def process(self, pipe, vace_video, vace_video_mask, vace_reference_image, vace_scale,
                height, width, num_frames, tiled, tile_size, tile_stride):
        if not _is_batched(vace_video, vace_video_mask, vace_reference_image):
            return original(self, pipe, vace_video, vace_video_mask, vace_reference_image,
                            vace_scale, height, width, num_frames, tiled, tile_size, tile_stride)
        from .vcu import encode_vcu
        if tiled:
            raise ValueError('batched VACE unit (vdot_ext patch): tiled VAE encoding is not '
                             'supported for tensor batches; pass tiled=False')
        ref = next(x for x in (vace_video, vace_video_mask, vace_reference_image) if x is not None)
        batch = ref.shape[0]
        if vace_video is None:
            vace_video = torch.zeros(batch, 3, num_frames, height, width)
        if vace_video_mask is None:
            vace_video_mask = torch.ones(batch, 1, *vace_video.shape[2:])
        if vace_video.shape[2] != num_frames or tuple(vace_video.shape[3:]) != (height, width):
            raise ValueError(f'batched VACE unit (vdot_ext patch): vace_video is '
                             f'{tuple(vace_video.shape)}, expected [B, 3, {num_frames}, {height}, '
                             f'{width}] (no silent truncation)')
        pipe.load_models_to_device(['vae'])
        context = encode_vcu(pipe.vae, vace_video, vace_video_mask, vace_reference_image)
        return {'vace_context': context.to(dtype=pipe.torch_dtype, device=pipe.device),
                'vace_scale': vace_scale}

    setattr(process, _PATCH_FLAG, True)
    unit_cls.process = process
    logger.info(f'vdot_ext: patched diffsynth {ver} WanVideoUnit_VACE.process for VCU batches')
    return True


def remove_vace_batch_patch() -> bool:
    """Restore diffsynth's own method. Returns True when something was restored."""
    from diffsynth.pipelines.wan_video import WanVideoUnit_VACE
    if not getattr(WanVideoUnit_VACE.process, _PATCH_FLAG, False):
        return False
    WanVideoUnit_VACE.process = WanVideoUnit_VACE.process.__wrapped__
    return True


def is_vace_batch_patch_applied() -> bool:
    from diffsynth.pipelines.wan_video import WanVideoUnit_VACE
    return bool(getattr(WanVideoUnit_VACE.process, _PATCH_FLAG, False))
