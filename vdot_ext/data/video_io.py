"""Video/image files: mp4 writing (imageio-ffmpeg, H.264), reading (decord),
png writing/reading, and side-by-side comparison videos.

Pixel conventions: tensors are ``[3, T, H, W]`` (videos) or ``[3, H, W]`` /
``[3, 1, H, W]`` (images) in [-1, 1]; files hold uint8 RGB. The map is
``u8 = round((x + 1) · 127.5)`` so grey 0 ≙ 127.5 (VACE's "missing pixel").

Writes are atomic (temporary file in the same folder, then rename; docs/DESIGN.md
§8): a killed demo never leaves a torn video that a rerun would take as done.
Read errors name the file.
"""
import contextlib
import os
import tempfile
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def video_to_uint8(video: ArrayLike, name: str = 'video') -> np.ndarray:
    """[3, T, H, W] float in [-1, 1] (tensor/array) or uint8 [T, H, W, 3] → uint8 THWC."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.dtype == torch.uint8:
            video = video.numpy()
        else:
            video = video.float().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f'{name}: uint8 videos must be [T, H, W, 3], got {video.shape}')
        return np.ascontiguousarray(video)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f'{name}: float videos must be [3, T, H, W] in [-1, 1], got {video.shape}')
    frames = np.clip((video.transpose(1, 2, 3, 0) + 1.0) * 127.5, 0, 255)
    return np.ascontiguousarray(np.round(frames).astype(np.uint8))


def uint8_to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] → float [3, T, H, W] in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f'expected uint8 [T, H, W, 3] frames, got {frames.dtype} {frames.shape}')
    return torch.from_numpy(frames.astype(np.float32)).permute(3, 0, 1, 2) / 127.5 - 1.0


def image_to_uint8(image: ArrayLike, name: str = 'image') -> np.ndarray:
    """[3, H, W] / [3, 1, H, W] float in [-1, 1] or uint8 [H, W, 3] → uint8 HWC."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.numpy() if image.dtype == torch.uint8 else image.float().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f'{name}: uint8 images must be [H, W, 3], got {image.shape}')
        return np.ascontiguousarray(image)
    if image.ndim == 4 and image.shape[:2] == (3, 1):
        image = image[:, 0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f'{name}: float images must be [3, H, W] or [3, 1, H, W], got {image.shape}')
    return video_to_uint8(image[:, None], name)[0]


def write_mp4(path: str, video: ArrayLike, fps: int = 8, crf: int = 12) -> str:
    """Write an H.264 mp4 (yuv420p, so H and W must be even), atomically."""
    import imageio.v2 as imageio
    frames = video_to_uint8(video)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f'write_mp4({path}): H.264/yuv420p needs even H and W, got {h}×{w}')
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # ffmpeg writes to a path (it picks the container from the extension): a
    # temporary .mp4 beside the target, renamed over it when complete
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp.mp4', dir=folder)
    os.close(fd)
    try:
        writer = imageio.get_writer(tmp, fps=fps, codec='libx264', quality=None, macro_block_size=1,
                                    pixelformat='yuv420p', ffmpeg_log_level='error',
                                    ffmpeg_params=['-crf', str(int(crf))])
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_video(path: str, backend: str = 'decord') -> np.ndarray:
    """All frames of a video file as uint8 [T, H, W, 3].

    ``backend='decord'`` (default) or ``'imageio'`` (imageio-ffmpeg). decord
    0.6 cannot read frames narrower than 64 px (its frame copy fails on the
    padded line size); that is reported as a ValueError naming the width.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'read_video: no such file {path}')
    if backend == 'imageio':
        import imageio.v2 as imageio
        reader = imageio.get_reader(path, format='ffmpeg')
        try:
            return np.stack([np.asarray(frame)[..., :3] for frame in reader])
        finally:
            reader.close()
    if backend != 'decord':
        raise ValueError(f"read_video: backend must be 'decord' or 'imageio', got {backend!r}")
    import decord
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        width = reader[0].shape[1] if len(reader) else 0
    except Exception as exc:  # decord's own error types; name the file
        raise ValueError(f'read_video({path}): cannot decode ({type(exc).__name__}: '
                         f'{str(exc).splitlines()[0][:200] if str(exc) else ""})') from None
    if width < 64:
        raise ValueError(f"read_video({path}): decord cannot decode frames narrower than 64 px "
                         f"(width {width}); use backend='imageio'")
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def write_png(path: str, image: ArrayLike) -> str:
    """Write a PNG atomically."""
    import imageio.v2 as imageio

    from vdot_ext.utils import atomic_write
    pixels = image_to_uint8(image)
    with atomic_write(path) as handle:
        imageio.imwrite(handle, pixels, format='png')
    return path


def read_png(path: str) -> np.ndarray:
    """uint8 [H, W, 3]."""
    import imageio.v2 as imageio
    if not os.path.isfile(path):
        raise FileNotFoundError(f'read_png: no such file {path}')
    try:
        image = np.asarray(imageio.imread(path))
    except Exception as exc:  # PIL/imageio errors rarely name the file
        raise ValueError(f'read_png({path}): cannot decode ({type(exc).__name__}: {exc})') from None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def mask_to_video(mask: ArrayLike) -> torch.Tensor:
    """[1, T, H, W] mask in [0, 1] → [3, T, H, W] in [-1, 1] (white = generate)."""
    mask = torch.as_tensor(mask).float()
    if mask.ndim != 4 or mask.shape[0] != 1:
        raise ValueError(f'mask_to_video: expected [1, T, H, W], got {tuple(mask.shape)}')
    return mask.expand(3, -1, -1, -1) * 2.0 - 1.0


def side_by_side(videos: Sequence[ArrayLike], labels: Optional[Sequence[str]] = None,
                 pad: int = 2, label_height: int = 12) -> np.ndarray:
    """Concatenate videos horizontally into one uint8 [T, H(+label), W_total, 3].

    Each entry is a [3, T, H, W] video in [-1, 1] (or uint8 THWC); a single
    image ([3, 1, H, W]) is repeated over time. All must share H; videos with
    frames must share T. ``labels`` are drawn in a black strip on top.
    """
    if not videos:
        raise ValueError('side_by_side: no videos given')
    clips = [video_to_uint8(v, f'videos[{i}]') for i, v in enumerate(videos)]
    lengths = {c.shape[0] for c in clips if c.shape[0] > 1}
    if len(lengths) > 1:
        raise ValueError(f'side_by_side: videos have different frame counts {sorted(lengths)}')
    heights = {c.shape[1] for c in clips}
    if len(heights) > 1:
        raise ValueError(f'side_by_side: videos have different heights {sorted(heights)}')
    t = lengths.pop() if lengths else 1
    clips = [np.repeat(c, t, axis=0) if c.shape[0] == 1 else c for c in clips]
    h = clips[0].shape[1]
    gap = np.full((t, h, pad, 3), 255, np.uint8)
    parts: List[np.ndarray] = []
    for i, clip in enumerate(clips):
        if i:
            parts.append(gap)
        parts.append(clip)
    grid = np.concatenate(parts, axis=2)
    if labels is not None:
        import cv2
        if len(labels) != len(clips):
            raise ValueError(f'side_by_side: {len(labels)} labels for {len(clips)} videos')
        strip = np.zeros((label_height, grid.shape[2], 3), np.uint8)
        x = 0
        for label, clip in zip(labels, clips):
            cv2.putText(strip, str(label), (x + 1, label_height - 3), cv2.FONT_HERSHEY_SIMPLEX,
                        0.3, (255, 255, 255), 1, cv2.LINE_AA)
            x += clip.shape[2] + pad
        grid = np.concatenate([np.repeat(strip[None], t, axis=0), grid], axis=1)
    return np.ascontiguousarray(grid)
