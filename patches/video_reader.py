"""Reading VCU inputs from files: videos with decord, images with PIL.

Geometry of one training sample (docs/DESIGN.md §4; default 81 × 480 × 832):

* **Frame sampling.** ``num_frames`` (4k+1, what the Wan VAE needs) indices are
  taken from the frame range ``[start, end)`` of the file, beginning at
  ``start``::

      stride mode:  idx_i = start + i · stride
      fps mode:     idx_i = start + ⌊i · native_fps / fps + ½⌋   (resample to ``fps``)

  for ``i = 0 … num_frames − 1``. Fewer frames than needed is an error naming the
  file (or, with ``on_short='pad'``, the last frame is repeated and a warning is
  logged); nothing is padded silently.
* **Resize/crop.** ``'cover'`` scales by ``s = max(H/h, W/w)`` (aspect kept),
  rounds the scaled size up to at least ``H × W`` and centre-crops; ``'stretch'``
  resizes to ``H × W``. cv2 ``INTER_AREA`` when shrinking (or ``INTER_LINEAR``,
  cheaper, with ``shrink='linear'``), ``INTER_LINEAR`` when enlarging. The
  same :class:`FrameGeometry` maps boxes given in source pixels.
* **Alignment.** A condition or mask video is read with the *same* frame indices
  and geometry as the ground-truth video; it must have the same frame count and
  size as that video (else an error naming both files).

Pixels stay ``uint8`` ``[T, H, W, 3]`` here (cheap); conversion to float in
[-1, 1] (``u8 / 127.5 − 1``, grey 127.5 ≙ 0) happens at the encoder.
"""
import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

RESIZE_MODES = ('cover', 'stretch')


class VCUInputError(ValueError):
    """Bad VCU input; the message names the sample, the field and the file.

    ``line`` (manifest line) and ``sample_id`` (the row's id) are kept as
    attributes for counting and reports; they do not change the message."""

    def __init__(self, message: str, sample: Optional[str] = None, field: Optional[str] = None,
                 path: Optional[str] = None, *, line: Optional[int] = None,
                 sample_id: Optional[str] = None):
        parts = []
        if sample is not None:
            parts.append(f'sample {sample}')
        if field is not None:
            parts.append(f'field {field!r}')
        if path is not None:
            parts.append(f'file {path}')
        prefix = ', '.join(parts)
        super().__init__(f'{prefix}: {message}' if prefix else message)
        self.sample, self.field, self.path = sample, field, path
        self.line, self.sample_id = line, sample_id


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    height: int
    width: int
    fps: float


@dataclass(frozen=True)
class FrameGeometry:
    """Source ``h × w`` → scaled ``rh × rw`` → crop ``[top:top+H, left:left+W]``."""
    src_height: int
    src_width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    height: int
    width: int

    def map_box(self, box: Sequence[float]) -> Tuple[int, int, int, int]:
        """``[x0, y0, x1, y1]`` in source pixels → integer output pixels, clipped.

        x0/y0 are floored and x1/y1 ceiled so the box covers every output pixel
        that overlaps the source box.
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        sx = self.resized_width / self.src_width
        sy = self.resized_height / self.src_height
        ox0 = int(math.floor(x0 * sx)) - self.left
        ox1 = int(math.ceil(x1 * sx)) - self.left
        oy0 = int(math.floor(y0 * sy)) - self.top
        oy1 = int(math.ceil(y1 * sy)) - self.top
        ox0, ox1 = max(0, min(self.width, ox0)), max(0, min(self.width, ox1))
        oy0, oy1 = max(0, min(self.height, oy0)), max(0, min(self.height, oy1))
        return ox0, oy0, ox1, oy1


def frame_geometry(src_height: int, src_width: int, height: int, width: int,
                   resize_mode: str = 'cover') -> FrameGeometry:
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f'resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}')
    if resize_mode == 'stretch':
        return FrameGeometry(src_height, src_width, height, width, 0, 0, height, width)
    scale = max(height / src_height, width / src_width)
    rh = max(height, int(math.ceil(src_height * scale - 1e-6)))
    rw = max(width, int(math.ceil(src_width * scale - 1e-6)))
    return FrameGeometry(src_height, src_width, rh, rw, (rh - height) // 2, (rw - width) // 2,
                         height, width)


SHRINK_INTERPOLATIONS = ('area', 'linear')


def resize_frames(frames: np.ndarray, geometry: FrameGeometry, shrink: str = 'area') -> np.ndarray:
    """uint8/float ``[T, h, w, C]`` (or ``[T, h, w]``) → ``[T, H, W, ...]`` per ``geometry``.

    ``shrink``: OpenCV interpolation when shrinking — ``'area'`` (pixel-area
    averaging, no aliasing) or ``'linear'`` (bilinear, ~3.5× cheaper, aliases
    fine texture beyond 2× reduction). Enlarging is always bilinear."""
    import cv2
    if shrink not in SHRINK_INTERPOLATIONS:
        raise ValueError(f'shrink interpolation must be one of {SHRINK_INTERPOLATIONS}, got {shrink!r}')
    g = geometry
    if (g.src_height, g.src_width) == (g.resized_height, g.resized_width):
        resized = frames
    else:
        smaller = g.resized_height * g.resized_width < g.src_height * g.src_width
        interp = (cv2.INTER_AREA if shrink == 'area' else cv2.INTER_LINEAR) if smaller else cv2.INTER_LINEAR
        out = np.empty((frames.shape[0], g.resized_height, g.resized_width) + frames.shape[3:],
                       frames.dtype)
        for t in range(frames.shape[0]):
            out[t] = cv2.resize(frames[t], (g.resized_width, g.resized_height), interpolation=interp)
        resized = out
    crop = resized[:, g.top:g.top + g.height, g.left:g.left + g.width]
    return np.ascontiguousarray(crop)


def _to_numpy(nd) -> np.ndarray:
    """decord NDArray → numpy without a copy (DLPack through torch; ``asnumpy``
    copies the whole clip, ~20 % of the decode time at 81 × 480 × 832)."""
    try:
        from torch.utils.dlpack import from_dlpack
        return from_dlpack(nd.to_dlpack()).numpy()
    except Exception:  # older decord/torch without DLPack interop
        return nd.asnumpy()


def _open(path: str, field: str, sample: Optional[str], num_threads: int = 1):
    import decord
    if not isinstance(path, str) or not path:
        raise VCUInputError('no path given', sample, field)
    if not os.path.isfile(path):
        raise VCUInputError('no such file', sample, field, path)
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=int(num_threads))
    except Exception as exc:  # decord raises DECORDError / RuntimeError on broken files
        raise VCUInputError(f'cannot open as a video (corrupt or unsupported): '
                            f'{type(exc).__name__}: {str(exc).splitlines()[0][:200]}',
                            sample, field, path) from None


def open_video(path: str, field: str = 'video', sample: Optional[str] = None,
               num_threads: int = 1):
    """``(decord reader, VideoInfo)``; errors name the file and field."""
    reader = _open(path, field, sample, num_threads)
    try:  # decord raises its own DECORDError on broken streams: name the file instead
        n = len(reader)
        if n < 1:
            raise VCUInputError('video has no frames', sample, field, path)
        h, w = reader[0].shape[:2]
        fps = float(reader.get_avg_fps())
    except VCUInputError:
        raise
    except Exception as exc:
        raise VCUInputError(f'cannot decode frame 0 (corrupt file?): {type(exc).__name__}: '
                            f'{str(exc).splitlines()[0][:200] if str(exc) else ""}', sample,
                            field, path) from None
    return reader, VideoInfo(path, int(n), int(h), int(w), fps)


def probe_video(path: str, field: str = 'video', sample: Optional[str] = None) -> VideoInfo:
    return open_video(path, field, sample)[1]


def sample_frame_indices(num_available: int,
                         num_frames: int,
                         stride: int = 1,
                         fps: Optional[float] = None,
                         native_fps: Optional[float] = None,
                         start: int = 0,
                         end: Optional[int] = None,
                         on_short: str = 'error',
                         where: str = 'video',
                         sample: Optional[str] = None) -> List[int]:
    """The frame indices of one clip (see module doc). ``end`` is exclusive."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f'num_frames={num_frames}: the Wan VAE needs 4k+1 frames')
    if on_short not in ('error', 'pad'):
        raise ValueError(f"on_short must be 'error' or 'pad', got {on_short!r}")
    end = num_available if end is None else int(end)
    start = int(start)
    if not 0 <= start < end <= num_available:
        raise VCUInputError(f'frame range [{start}, {end}) is not inside the video\'s '
                            f'{num_available} frames', sample, 'frame_start/frame_end', where)
    if fps is not None:
        if not native_fps or native_fps <= 0:
            raise VCUInputError('fps sampling needs the native fps, the file reports none',
                                sample, 'fps', where)
        step = float(native_fps) / float(fps)
        idx = [start + int(math.floor(i * step + 0.5)) for i in range(num_frames)]
    else:
        if int(stride) < 1:
            raise ValueError(f'frame_stride must be ≥ 1, got {stride}')
        idx = [start + i * int(stride) for i in range(num_frames)]
    available = [i for i in idx if i < end]
    if len(available) < num_frames:
        msg = (f'too few frames: {num_frames} frames at '
               f'{"fps " + str(fps) if fps is not None else "stride " + str(stride)} need frame '
               f'{idx[-1]}, the range [{start}, {end}) has {end - start}')
        if on_short == 'error' or not available:
            raise VCUInputError(msg, sample, 'video', where)
        logger.warning(f'sample {sample}, {where}: {msg}; repeating frame {available[-1]} '
                       f'{num_frames - len(available)} times (on_short="pad")')
        available += [available[-1]] * (num_frames - len(available))
    return available


def read_video_frames(path: str,
                      indices: Sequence[int],
                      height: int,
                      width: int,
                      resize_mode: str = 'cover',
                      field: str = 'video',
                      sample: Optional[str] = None,
                      expect: Optional[VideoInfo] = None,
                      reader=None,
                      num_threads: int = 1,
                      shrink: str = 'area') -> Tuple[np.ndarray, FrameGeometry]:
    """uint8 ``[T, H, W, 3]`` frames ``indices`` of ``path`` and their geometry.

    ``expect``: the ground-truth video's info; this file must match its frame
    count and size (condition/mask alignment).
    """
    reader = reader or _open(path, field, sample, num_threads)
    n = len(reader)
    if expect is not None and n != expect.num_frames:
        raise VCUInputError(f'{n} frames, but the ground-truth video {expect.path} has '
                            f'{expect.num_frames} (length mismatch)', sample, field, path)
    if max(indices) >= n:
        raise VCUInputError(f'too few frames: frame {max(indices)} requested, the file has {n}',
                            sample, field, path)
    try:
        unique = sorted(set(int(i) for i in indices))
        batch = _to_numpy(reader.get_batch(unique))
    except Exception as exc:
        raise VCUInputError(f'cannot decode frames (corrupt file?): {type(exc).__name__}: '
                            f'{str(exc).splitlines()[0][:200] if str(exc) else ""}',
                            sample, field, path) from None
    if batch.ndim != 4 or batch.shape[0] != len(unique) or batch.shape[-1] != 3:
        raise VCUInputError(f'decoder returned {batch.shape}, expected [{len(unique)}, h, w, 3]',
                            sample, field, path)
    if len(unique) != len(indices):
        pos = {i: k for k, i in enumerate(unique)}
        batch = batch[[pos[int(i)] for i in indices]]
    h, w = batch.shape[1:3]
    if expect is not None and (h, w) != (expect.height, expect.width):
        raise VCUInputError(f'size {h}×{w} (H×W) differs from the ground-truth video '
                            f'{expect.path} ({expect.height}×{expect.width}) (size mismatch)',
                            sample, field, path)
    geometry = frame_geometry(h, w, height, width, resize_mode)
    return resize_frames(batch, geometry, shrink), geometry


def read_image(path: str, field: str = 'ref_images', sample: Optional[str] = None) -> np.ndarray:
    """uint8 ``[h, w, 3]`` RGB via PIL (alpha dropped, grey expanded)."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(path, str) or not path:
        raise VCUInputError('no path given', sample, field)
    if not os.path.isfile(path):
        raise VCUInputError('no such file', sample, field, path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = np.array(image.convert('RGB'))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise VCUInputError(f'cannot read as an image (corrupt or unsupported): {exc}',
                            sample, field, path) from None
    return np.ascontiguousarray(rgb)


def is_image_path(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


def binarize_mask(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` or ``[T, H, W]`` mask pixels → bool ``[T, H, W]``
    (True = generate: luminance > 127.5, i.e. the mask value > 0.5)."""
    if frames.ndim == 4:
        frames = frames.max(axis=-1)  # channels agree for a grey mask; max tolerates tinting
    return frames > 127


def read_mask(path: str,
              indices: Sequence[int],
              height: int,
              width: int,
              resize_mode: str = 'cover',
              sample: Optional[str] = None,
              expect: Optional[VideoInfo] = None,
              num_threads: int = 1,
              shrink: str = 'area') -> np.ndarray:
    """bool ``[T, H, W]`` mask (True = generate) from a mask video or a single
    mask image (used for every frame), aligned with the ground-truth video.

    Resized with the video's interpolation and binarised at 0.5 afterwards, so
    mask edges land where the video's edges land.
    """
    field = 'mask'
    if is_image_path(path):
        image = read_image(path, field, sample)
        if expect is not None and image.shape[:2] != (expect.height, expect.width):
            raise VCUInputError(f'mask image size {image.shape[0]}×{image.shape[1]} differs from '
                                f'the ground-truth video {expect.path} '
                                f'({expect.height}×{expect.width}) (size mismatch)',
                                sample, field, path)
        geometry = frame_geometry(image.shape[0], image.shape[1], height, width, resize_mode)
        one = resize_frames(image[None], geometry, shrink)
        return np.repeat(binarize_mask(one), len(indices), axis=0)
    frames, _ = read_video_frames(path, indices, height, width, resize_mode, field, sample, expect,
                                  num_threads=num_threads, shrink=shrink)
    return binarize_mask(frames)
