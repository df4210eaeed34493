"""Procedural videos + VCUs for the tiny end-to-end demo.

Each sample is a textured shape (circle/square/triangle/diamond; plain, striped
or checkered) moving in a straight line (left/right/up/down) over a plain or
gradient background, captioned e.g. "a red striped circle moving left on a
blue gradient background". Everything is a deterministic function of
``(seed, index)``.

Sample ``index`` gets task ``tasks[index % len(tasks)]``. Its VCU ``[T; F; M]``
is built by :mod:`vdot_ext.patches.tasks` from the rendered video (as uint8 RGB,
what a manifest's mp4 gives) — the same builders, VACE conventions and options
as :class:`~vdot_ext.patches.vcu_dataset.VCUManifestDataset` (docs/DESIGN.md
§10). Any task derivable without a model works; the demo's names are aliases:

==================  ===============  =============================================
demo name           patches task     F / M (1 = generate)
==================  ===============  =============================================
``t2v``             ``t2v``          grey × n / 1 × n
``r2v``             ``reference``    ref (object on white) prepended, grey × n /
                                     ref 0, then 1 × n
``v2v_gray``        ``grey``         VACE grey 0.114 R + 0.587 G + 0.299 B / 1 × n
``mv2v_outpaint``   ``outpaint``     video, grey border (VACE ``expand_ratio``
                                     0.25 on left and right) / 1 on the border
==================  ===============  =============================================

Encoded tensors (text context, VAE latents of the real video — with the
reference latents prepended for reference tasks — and the 96-channel
``vace_context``) are cached in ``cache_dir`` under a key hashing the
pixel/caption configuration, the condition version
(``patches.tasks.CONDITION_VERSION``) and the sha256 of both codec checkpoints.
A matching cache is reused; otherwise the dataset encodes and logs why (``no
cache file``); a cache file whose stored key disagrees with its name, or that
holds NaN/Inf, raises naming the file. Cache and index files are written
atomically (docs/DESIGN.md §8).
"""
import hashlib
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vdot_ext.patches import tasks as vcu_tasks
from vdot_ext.registry import DATASETS, FUNCTIONS
from vdot_ext.utils import NonFiniteError, atomic_write, nonfinite_names, safe_torch_load, save_torch, write_json


def _default_logger() -> logging.Logger:
    """mmengine's current logger (the Runner's / stage driver's log file)."""
    from mmengine.logging import MMLogger
    return MMLogger.get_current_instance()


# bump when the video renderer changes: retrains the tiny VAE, invalidates caches
GENERATOR_VERSION = 1
# bump when the dataset's pixels change for the same renderer (2: references on
# white, VCUs built by patches.tasks from uint8 frames); invalidates caches only
DATASET_VERSION = 2

# the demo's task names (aliases of patches tasks, see the module table)
DEMO_TASKS = ('t2v', 'r2v', 'v2v_gray', 'mv2v_outpaint')
TASKS = DEMO_TASKS

# RGB in [0, 1]
COLOURS = {
    'red': (0.86, 0.16, 0.14),
    'green': (0.18, 0.72, 0.22),
    'blue': (0.16, 0.32, 0.88),
    'yellow': (0.96, 0.86, 0.16),
    'purple': (0.58, 0.22, 0.74),
    'orange': (0.97, 0.56, 0.10),
    'white': (0.95, 0.95, 0.95),
    'cyan': (0.12, 0.80, 0.86),
}
SHAPES = ('circle', 'square', 'triangle', 'diamond')
TEXTURES = ('plain', 'striped', 'checkered')
DIRECTIONS = {'left': (-1.0, 0.0), 'right': (1.0, 0.0), 'up': (0.0, -1.0), 'down': (0.0, 1.0)}
BACKGROUNDS = ('plain', 'gradient')


def caption_vocabulary() -> List[str]:
    """Every word a caption can contain (the tiny text encoder's vocabulary)."""
    words = ['a', 'an', 'moving', 'on', 'background', 'gradient', 'striped', 'checkered']
    words += list(COLOURS) + list(SHAPES) + list(DIRECTIONS)
    return words


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), 7919])


def sample_scene(seed: int, index: int) -> dict:
    """The random choices for sample ``index`` (pure function of seed, index)."""
    rng = _rng(seed, index)
    colour = str(rng.choice(list(COLOURS)))
    background = str(rng.choice([c for c in COLOURS if c != colour]))
    scene = dict(
        colour=colour,
        shape=str(rng.choice(SHAPES)),
        texture=str(rng.choice(TEXTURES)),
        direction=str(rng.choice(list(DIRECTIONS))),
        background=background,
        background_kind=str(rng.choice(BACKGROUNDS)),
        size=float(rng.uniform(0.16, 0.24)),  # radius / min(H, W)
        travel=float(rng.uniform(0.30, 0.50)),  # displacement over the clip / frame size
        offset=float(rng.uniform(-0.15, 0.15)),  # perpendicular offset / frame size
        stripe_angle=float(rng.choice([0.0, 0.25 * np.pi, 0.5 * np.pi, 0.75 * np.pi])),
        phase=float(rng.uniform(0, 2 * np.pi)),
    )
    return scene


def scene_caption(scene: dict) -> str:
    texture = '' if scene['texture'] == 'plain' else scene['texture'] + ' '
    kind = 'gradient ' if scene['background_kind'] == 'gradient' else ''
    article = 'an' if scene['colour'][0] in 'aeiou' else 'a'
    bg_article = 'an' if scene['background'][0] in 'aeiou' else 'a'
    return (f"{article} {scene['colour']} {texture}{scene['shape']} moving {scene['direction']} "
            f"on {bg_article} {scene['background']} {kind}background")


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance in pixels, > 0 inside."""
    if shape == 'circle':
        return radius - np.sqrt(dx**2 + dy**2)
    if shape == 'square':
        return 0.85 * radius - np.maximum(np.abs(dx), np.abs(dy))
    if shape == 'diamond':
        return (1.2 * radius - (np.abs(dx) + np.abs(dy))) / np.sqrt(2.0)
    if shape == 'triangle':  # equilateral, apex up, circumradius = radius
        dists = [radius / 2 - (dx * np.cos(a) + dy * np.sin(a))
                 for a in (0.5 * np.pi, 7 / 6 * np.pi, 11 / 6 * np.pi)]
        return np.minimum(np.minimum(dists[0], dists[1]), dists[2])
    raise ValueError(f'unknown shape {shape!r}')


def _object_layer(scene: dict, dx: np.ndarray, dy: np.ndarray, radius: float, period: float):
    """(alpha [.., H, W], rgb [.., H, W, 3]) of the textured object in [0, 1]."""
    alpha = np.clip(_shape_sdf(scene['shape'], dx, dy, radius) + 0.5, 0.0, 1.0)
    base = np.asarray(COLOURS[scene['colour']])
    dark = 0.45 * base + 0.05
    if scene['texture'] == 'plain':
        amount = np.zeros_like(dx)
    elif scene['texture'] == 'striped':
        a = scene['stripe_angle']
        u = dx * np.cos(a) + dy * np.sin(a)
        # soft-edged stripes: a clipped sine keeps the edges band-limited
        amount = np.clip(0.5 + 1.5 * np.sin(2 * np.pi * u / period + scene['phase']), 0.0, 1.0)
    else:  # checkered
        cu = np.clip(0.5 + 1.5 * np.sin(np.pi * dx / (0.5 * period) + scene['phase']), 0, 1)
        cv = np.clip(0.5 + 1.5 * np.sin(np.pi * dy / (0.5 * period)), 0, 1)
        amount = cu * cv + (1 - cu) * (1 - cv)
    rgb = base * (1 - amount[..., None]) + dark * amount[..., None]
    return alpha, rgb


def render_scene(scene: dict, num_frames: int, height: int, width: int):
    """Render (video [3, T, H, W], reference [3, 1, H, W]) in [-1, 1] (float32).

    The reference is the object, centred, on white (1.0): VACE's reference
    convention (``vace/annotators/subject.py`` puts the subject on white 255,
    ``prepare_source`` pads references with white).
    """
    size = min(height, width)
    radius = scene['size'] * size
    period = max(6.0, size / 8.0)
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float64) + 0.5,
                         np.arange(width, dtype=np.float64) + 0.5, indexing='ij')
    # background: plain colour or a vertical gradient from dark (top) to the colour
    bg = np.asarray(COLOURS[scene['background']]) * 0.75
    if scene['background_kind'] == 'gradient':
        ramp = (0.35 + 0.65 * ys / height)[..., None]
    else:
        ramp = np.ones_like(ys)[..., None]
    background = bg * ramp  # [H, W, 3]
    # straight-line motion through the frame centre
    ux, uy = DIRECTIONS[scene['direction']]
    travel = scene['travel'] * np.array([width, height])
    # start half a travel before the centre, shifted across the motion by `offset`
    cx0 = width / 2 - ux * travel[0] / 2 + (uy != 0) * scene['offset'] * width
    cy0 = height / 2 - uy * travel[1] / 2 + (ux != 0) * scene['offset'] * height
    frames = np.empty((num_frames, height, width, 3), np.float64)
    for t in range(num_frames):
        s = t / max(num_frames - 1, 1)
        cx = cx0 + ux * travel[0] * s
        cy = cy0 + uy * travel[1] * s
        alpha, rgb = _object_layer(scene, xs - cx, ys - cy, radius, period)
        frames[t] = background * (1 - alpha[..., None]) + rgb * alpha[..., None]
    alpha, rgb = _object_layer(scene, xs - width / 2, ys - height / 2, radius, period)
    ref = rgb * alpha[..., None] + (1 - alpha[..., None])  # blend with white
    ref = ref * 2 - 1
    video = torch.from_numpy(frames * 2 - 1).float().permute(3, 0, 1, 2).contiguous()
    reference = torch.from_numpy(ref).float().permute(2, 0, 1)[:, None].contiguous()
    return video, reference


def check_synthetic_task(task: str) -> str:
    """The patches task of ``task`` (a task name or alias, e.g. the demo's
    ``'v2v_gray'``), or ``ValueError`` when a rendered video cannot provide it:
    depth/pose controls come from a model, inpainting from a mask or box."""
    try:
        canonical, _ = vcu_tasks.resolve_task(task)
    except KeyError as exc:
        raise ValueError(f'SyntheticVideoDataset.tasks: {exc.args[0]}') from None
    spec = vcu_tasks.TASKS[canonical]
    if spec.control in vcu_tasks.MODEL_MADE_CONTROLS or canonical == 'inpaint':
        need = 'a mask or box' if canonical == 'inpaint' else f'a {spec.control} model'
        raise ValueError(f'SyntheticVideoDataset.tasks: task {task!r} ({canonical}) needs {need}, '
                         'which synthetic videos do not have; use a manifest '
                         '(VCUManifestDataset) for it')
    return canonical


def vcu_pixels(task: str, video: torch.Tensor, reference: torch.Tensor,
               options: Optional[dict] = None, sample_id: str = 'synthetic',
               rng: Optional[np.random.Generator] = None) -> dict:
    """The VCU of a rendered sample, built by :func:`vdot_ext.patches.tasks.build_vcu`.

    ``video [3, T, H, W]`` and ``reference [3, 1, H, W]`` in [-1, 1] are first
    rounded to uint8 (what a decoded mp4/png gives). Returns ``video`` (the
    rounded video), ``frames [3, T, H, W]``, ``masks [1, T, H, W]``,
    ``ref_images [3, n_ref, H, W]`` or None (pixels in [-1, 1]), the patches
    ``canonical_task`` and the builder's ``info``.
    """
    from vdot_ext.data.video_io import image_to_uint8, video_to_uint8
    canonical = check_synthetic_task(task)
    spec = vcu_tasks.TASKS[canonical]
    refs = [image_to_uint8(reference)] if spec.uses_refs else None
    source = vcu_tasks.SourceSample(str(sample_id), video_to_uint8(video), ref_images=refs, rng=rng)
    p = vcu_tasks.build_vcu(task, source, options)
    return dict(video=p.video_tensor(), frames=p.frames_tensor(), masks=p.masks_tensor(),
                ref_images=p.ref_images, canonical_task=canonical, info=p.info)


def render_training_videos(num_videos: int, num_frames: int = 17, height: int = 64, width: int = 64,
                           seed: int = 0) -> torch.Tensor:
    """[N, 3, T, H, W] videos from the same generator (for training the tiny VAE)."""
    return torch.stack([render_scene(sample_scene(seed, i), num_frames, height, width)[0]
                        for i in range(num_videos)])


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _jsonable(options: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}


@DATASETS.register_module()
class SyntheticVideoDataset(Dataset):
    """Procedural VCU dataset, encoded with the tiny codecs (see module doc).

    Args:
        num_samples: number of samples.
        tasks: task cycle; sample i has task ``tasks[i % len(tasks)]``. Any
            :mod:`vdot_ext.patches.tasks` name or alias a rendered video can
            provide (not depth/pose/inpaint); the demo's names are aliases.
        num_frames, height, width: pixel geometry (4k+1 frames, multiples of 16).
        seed: generator seed (samples are deterministic per (seed, index),
            including the per-sample draws of random extension modes).
        data_root: mp4 videos and png references are written under
            ``data_root/videos/<config-hash>/`` and ``data_root/references/<config-hash>/``.
        vae_checkpoint, text_encoder_checkpoint: ``TinyWanVAE`` / ``TinyTextEncoder``
            checkpoints (see :func:`prepare_tiny_codecs`).
        task_options: task options (``patches.tasks.DEFAULT_OPTIONS``, VACE's
            names: ``expand_ratio``, ``direction``, ``extension_mode``, ...).
        with_vace_context: False for the T2V-only stage 1 (no ``vace_context``).
        cache_dir: where encoded tensors are cached (default ``data_root/cache``).
        write_files: write mp4/png files (missing ones only).
        batch_size: samples per VAE batch while encoding.
        fps: fps of the written mp4s.

    ``__getitem__`` returns ``dict(prompt, task, context [L, text_dim],
    latents [16, n_ref + F_lat, h, w], vace_context [96, n_ref + F_lat, h, w]
    (if enabled), num_ref, index, sample_id)``; ``task`` is the name as
    configured, ``sample_id`` is ``'<config-hash>/<index>'`` (the mp4's path
    under ``data_root/videos``).
    """

    def __init__(self,
                 num_samples: int,
                 vae_checkpoint: str,
                 text_encoder_checkpoint: str,
                 data_root: str,
                 tasks: Sequence[str] = DEMO_TASKS,
                 num_frames: int = 17,
                 height: int = 64,
                 width: int = 64,
                 seed: int = 0,
                 task_options: Optional[dict] = None,
                 with_vace_context: bool = True,
                 cache_dir: Optional[str] = None,
                 write_files: bool = True,
                 batch_size: int = 16,
                 fps: int = 8,
                 logger: Optional[logging.Logger] = None):
        super().__init__()
        self.logger = logger or _default_logger()
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError('SyntheticVideoDataset.tasks: empty')
        self.canonical_tasks = {task: check_synthetic_task(task) for task in tasks}
        if int(num_samples) < 1:
            raise ValueError(f'SyntheticVideoDataset.num_samples must be ≥ 1, got {num_samples}')
        if (num_frames - 1) % 4 != 0:
            raise ValueError(f'SyntheticVideoDataset.num_frames={num_frames}: must be 4k+1')
        if height % 16 or width % 16:
            raise ValueError(f'SyntheticVideoDataset.height/width={height}/{width}: '
                             'must be multiples of 16')
        try:
            self.task_options = vcu_tasks.merge_options(task_options)
        except (KeyError, ValueError) as exc:
            raise ValueError(f'SyntheticVideoDataset.task_options: {exc}') from None
        for name, path in (('vae_checkpoint', vae_checkpoint),
                           ('text_encoder_checkpoint', text_encoder_checkpoint)):
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(f'SyntheticVideoDataset.{name}: no file at {path!r} '
                                        '(run prepare_tiny_codecs first)')
        self.num_samples = int(num_samples)
        self.tasks = tasks
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.seed = int(seed)
        self.with_vace_context = bool(with_vace_context)
        self.vae_checkpoint = vae_checkpoint
        self.text_encoder_checkpoint = text_encoder_checkpoint
        self.data_root = data_root
        self.cache_dir = cache_dir or os.path.join(data_root, 'cache')
        self.batch_size = int(batch_size)
        self.fps = int(fps)
        self.num_encoded = 0  # samples encoded by this instance (0 on a cache hit)

        self.pixel_config = dict(generator_version=GENERATOR_VERSION, dataset_version=DATASET_VERSION,
                                 condition_version=vcu_tasks.CONDITION_VERSION,
                                 num_samples=self.num_samples, tasks=list(self.tasks),
                                 num_frames=self.num_frames, height=self.height, width=self.width,
                                 seed=self.seed, task_options=_jsonable(self.task_options))
        self.pixel_key = _hash(self.pixel_config)[:12]
        from vdot_ext.models.tiny_codecs import file_sha256
        self.cache_config = dict(self.pixel_config, with_vace_context=self.with_vace_context,
                                 vae_sha256=file_sha256(vae_checkpoint),
                                 text_encoder_sha256=file_sha256(text_encoder_checkpoint))
        self.cache_key = _hash(self.cache_config)
        self.cache_path = os.path.join(self.cache_dir, f'synthetic_vcu_{self.cache_key[:16]}.pt')

        self.prompts = [scene_caption(sample_scene(self.seed, i)) for i in range(self.num_samples)]
        self.sample_tasks = [self.tasks[i % len(self.tasks)] for i in range(self.num_samples)]
        self._check_render_once()
        self._encoded = self._load_or_encode()
        if write_files:
            self.write_files()

    def _check_render_once(self) -> None:
        """Build each task's VCU for its first sample: a task or option that cannot
        be built fails here, before any encoding."""
        for task in self.tasks:
            index = self.sample_tasks.index(task) if task in self.sample_tasks else None
            if index is not None:
                self.get_pixels(index)

    # -- pixels ------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def shape_key(self, index: int) -> int:
        """Samples with equal keys have equal tensor shapes (the number of
        reference frames prepended); used by ``ShapeGroupedBatchSampler``."""
        return int(self._encoded['num_ref'][self._check_index(index)])

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f'SyntheticVideoDataset: index {index} out of range [0, {self.num_samples})')
        return index

    def sample_id(self, index: int) -> str:
        """``'<config-hash>/<index>'``: the sample's mp4 is ``data_root/videos/<sample_id>.mp4``."""
        return f'{self.pixel_key}/{self._check_index(index):05d}'

    def get_pixels(self, index: int) -> Dict[str, object]:
        """Pixel data of sample ``index`` (regenerated, deterministic):
        ``video [3, T, H, W]`` (the real video, rounded to uint8 levels),
        ``frames [3, T, H, W]``, ``masks [1, T, H, W]``, ``ref_images
        [3, n_ref, H, W]`` or None, plus ``prompt``, ``task`` (as configured),
        ``canonical_task``, ``scene``, ``sample_id`` and ``info`` (e.g. the
        extension mode drawn); all pixels in [-1, 1]."""
        index = self._check_index(index)
        scene = sample_scene(self.seed, index)
        video, reference = render_scene(scene, self.num_frames, self.height, self.width)
        task = self.sample_tasks[index]
        rng = np.random.default_rng([self.seed, index, 104729])  # per-sample task draws
        vcu = vcu_pixels(task, video, reference, self.task_options, self.sample_id(index), rng)
        return dict(prompt=self.prompts[index], task=task, scene=scene,
                    sample_id=self.sample_id(index), **vcu)

    def video_path(self, index: int) -> str:
        return os.path.join(self.data_root, 'videos', self.pixel_key, f'{index:05d}.mp4')

    def reference_path(self, index: int) -> str:
        return os.path.join(self.data_root, 'references', self.pixel_key, f'{index:05d}.png')

    def _uses_refs(self, index: int) -> bool:
        return vcu_tasks.TASKS[self.canonical_tasks[self.sample_tasks[index]]].uses_refs

    def write_files(self) -> None:
        """Write missing mp4s (real videos), pngs (references) and an index.jsonl."""
        from vdot_ext.data.video_io import write_mp4, write_png
        records = []
        for index in range(self.num_samples):
            video_path, ref_path = self.video_path(index), self.reference_path(index)
            need_ref = self._uses_refs(index)
            pixels = None
            if not os.path.isfile(video_path) or (need_ref and not os.path.isfile(ref_path)):
                pixels = self.get_pixels(index)
                write_mp4(video_path, pixels['video'], fps=self.fps)
                if need_ref:
                    write_png(ref_path, pixels['ref_images'][:, :1])
            records.append(dict(index=index, sample_id=self.sample_id(index),
                                task=self.sample_tasks[index], prompt=self.prompts[index],
                                video=os.path.relpath(video_path, self.data_root),
                                reference=os.path.relpath(ref_path, self.data_root) if need_ref else None))
        index_path = os.path.join(self.data_root, 'videos', self.pixel_key, 'index.jsonl')
        with atomic_write(index_path, 'w') as handle:
            handle.write(json.dumps(dict(config=self.pixel_config)) + '\n')
            for record in records:
                handle.write(json.dumps(record) + '\n')

    # -- encoded tensors ---------------------------------------------------
    @staticmethod
    def _tensors(payload: dict) -> Dict[str, torch.Tensor]:
        """The cache's tensors by name (``latents.3``, ``vace_context.0``, ...)."""
        out = {'context': payload['context']}
        for name in ('latents', 'vace_context'):
            for i, tensor in enumerate(payload.get(name) or []):
                out[f'{name}.{i}'] = tensor
        return out

    def _check_finite(self, payload: dict, what: str) -> None:
        bad = nonfinite_names(self._tensors(payload))
        if bad:
            more = f' (+{len(bad) - 8} more)' if len(bad) > 8 else ''
            raise NonFiniteError(f'{self.cache_path}: {what} hold NaN/Inf in {bad[:8]}{more}; '
                                 'delete the file to re-encode, and check the codec checkpoints')

    def _load_or_encode(self) -> dict:
        if os.path.isfile(self.cache_path):
            payload = safe_torch_load(self.cache_path, field='SyntheticVideoDataset cache')
            if not isinstance(payload, dict) or payload.get('cache_key') != self.cache_key:
                stored = payload.get('cache_key') if isinstance(payload, dict) else None
                raise ValueError(f'{self.cache_path}: stored cache key {stored!r} '
                                 f'does not match this configuration ({self.cache_key!r}); the file '
                                 'is stale or corrupt — delete it to re-encode')
            self._check_finite(payload, 'the cached tensors')
            self.logger.info(f'SyntheticVideoDataset: reusing encoded cache {self.cache_path}')
            return payload
        self.logger.info(f'SyntheticVideoDataset: no cache file {self.cache_path} for this '
                         f'configuration/codec checkpoints; encoding {self.num_samples} samples')
        payload = self._encode_all()
        self._check_finite(payload, 'the freshly encoded tensors (not written)')
        save_torch(payload, self.cache_path)  # atomic: no half-written cache
        return payload

    @torch.no_grad()
    def _encode_all(self) -> dict:
        """Encode every sample; VAE calls batched per task (same reference count)."""
        from vdot_ext.models.tiny_codecs import TinyTextEncoder, TinyWanVAE
        from vdot_ext.patches.vcu import encode_vcu, encode_videos
        start = time.perf_counter()
        vae = TinyWanVAE.load(self.vae_checkpoint)
        text_encoder = TinyTextEncoder.load(self.text_encoder_checkpoint)
        contexts = torch.cat([text_encoder.encode(self.prompts[i:i + 64])
                              for i in range(0, self.num_samples, 64)])
        latents: List[Optional[torch.Tensor]] = [None] * self.num_samples
        vace: List[Optional[torch.Tensor]] = [None] * self.num_samples
        num_ref = [0] * self.num_samples
        for task in self.tasks:
            indices = [i for i in range(self.num_samples) if self.sample_tasks[i] == task]
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo:lo + self.batch_size]
                pixels = [self.get_pixels(i) for i in chunk]
                videos = torch.stack([p['video'] for p in pixels])
                # batched VideoVAE_.encode: same result as vae.encode, ~5× faster
                video_latents = encode_videos(vae.wan_vae, videos)
                refs = None
                if pixels[0]['ref_images'] is not None:
                    refs = torch.stack([p['ref_images'] for p in pixels])  # [B, 3, n_ref, H, W]
                    n = refs.shape[2]
                    ref_latents = encode_videos(vae.wan_vae, refs.permute(0, 2, 1, 3, 4).reshape(
                        -1, 3, 1, *refs.shape[3:]))
                    ref_latents = ref_latents.reshape(len(chunk), n, *ref_latents.shape[1:])[:, :, :, 0]
                    # reference latent frames prepended, like the VACE context
                    video_latents = torch.cat([ref_latents.permute(0, 2, 1, 3, 4), video_latents], dim=2)
                if self.with_vace_context:
                    context = encode_vcu(vae, torch.stack([p['frames'] for p in pixels]),
                                         torch.stack([p['masks'] for p in pixels]), refs)
                for k, i in enumerate(chunk):
                    latents[i] = video_latents[k].clone()
                    num_ref[i] = 0 if refs is None else refs.shape[2]
                    if self.with_vace_context:
                        vace[i] = context[k].clone()
                self.num_encoded += len(chunk)
        seconds = time.perf_counter() - start
        self.logger.info(f'SyntheticVideoDataset: encoded {self.num_samples} samples in {seconds:.1f}s')
        return dict(cache_key=self.cache_key, config=self.cache_config, prompts=list(self.prompts),
                    tasks=list(self.sample_tasks), context=contexts, latents=latents,
                    vace_context=vace if self.with_vace_context else None, num_ref=num_ref,
                    encode_seconds=seconds)

    def __getitem__(self, index: int) -> Dict[str, object]:
        index = self._check_index(index)
        enc = self._encoded
        item = dict(prompt=self.prompts[index], task=self.sample_tasks[index],
                    context=enc['context'][index], latents=enc['latents'][index],
                    num_ref=int(enc['num_ref'][index]), index=index, sample_id=self.sample_id(index))
        if self.with_vace_context:
            item['vace_context'] = enc['vace_context'][index]
        return item


def _codec_config_matches(path: str, kind: str, expected: dict) -> bool:
    if not os.path.isfile(path):
        return False
    payload = safe_torch_load(path, field=f'tiny {kind} codec')
    stored = payload.get('extra', {}).get('prepare_config') if kind == 'vae' else payload.get('config')
    return stored == expected


@FUNCTIONS.register_module()
def prepare_tiny_codecs(work_dir: str,
                        num_frames: int = 17,
                        height: int = 64,
                        width: int = 64,
                        seed: int = 0,
                        num_train_videos: int = 48,
                        vae_steps: int = 400,
                        vae_lr: float = 5e-4,
                        vae_batch_size: int = 2,
                        vae_clip_frames: Optional[int] = None,
                        vae_crop_size: Optional[int] = 32,
                        vae_device: Optional[str] = None,
                        vae_cfg: Optional[dict] = None,
                        text_cfg: Optional[dict] = None,
                        pretrained: Optional[str] = None,
                        pretrained_sha256: Optional[dict] = None,
                        logger: Optional[logging.Logger] = None) -> Dict[str, object]:
    """Train (once) and save the tiny VAE and build the tiny text encoder, or,
    with ``pretrained``, install the shipped ones.

    ``pretrained``: ``'shipped'`` (the package's ``vdot_ext/demo_assets``) or a
    folder made by ``python -m vdot_ext.tools.make_demo_assets``. Its
    ``tiny_wan_vae.safetensors`` and ``tiny_text_encoder.safetensors`` are
    checked against ``pretrained_sha256`` (``dict(vae=..., text_encoder=...)``,
    the config's pin; default: the folder's ``manifest.json``), read with
    ``TinyWanVAE.load_safetensors`` / ``TinyTextEncoder.load_safetensors`` and
    written to the same ``.pth`` files as the trained ones; the training
    options are then unused (logged). The assets' renderer version must equal
    ``GENERATOR_VERSION`` and their geometry this call's.

    Files: ``<work_dir>/codecs/tiny_wan_vae.pth``,
    ``<work_dir>/codecs/tiny_text_encoder.pth`` and ``tiny_codecs.json`` (metrics).
    When a checkpoint exists and was built with the same configuration it is
    reused (logged); otherwise it is (re)built and overwritten (logged).
    The VAE trains on videos of this generator under a different seed
    (``seed + 1_000_003``) than the dataset's default, on whole clips
    (``vae_clip_frames`` = ``num_frames`` by default: shorter clips never train
    the causal cache's steady state and later frames come out much worse) and
    32×32 crops (4× cheaper than 64×64; the VAE is convolutional).
    ``vae_device`` runs its training steps there (default: the CPU; see
    ``train_tiny_vae``). It is not part of the VAE's recipe (``prepare_config``),
    so a VAE trained on a GPU is reused by a call that names another device.

    Returns ``dict(vae_checkpoint, text_encoder_checkpoint, text_dim, metrics)``.
    """
    from vdot_ext.models.tiny_codecs import TinyTextEncoder, TinyWanVAE, train_tiny_vae
    logger = logger or _default_logger()
    codec_dir = os.path.join(work_dir, 'codecs')
    os.makedirs(codec_dir, exist_ok=True)
    vae_path = os.path.join(codec_dir, 'tiny_wan_vae.pth')
    text_path = os.path.join(codec_dir, 'tiny_text_encoder.pth')
    metrics_path = os.path.join(codec_dir, 'tiny_codecs.json')
    vae_cfg = dict(dict(dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1, seed=seed), **(vae_cfg or {}))
    text_cfg = dict(dict(max_length=16, dim=32, dim_attn=32, dim_ffn=64, num_heads=2,
                         num_layers=2, num_buckets=32, seed=seed), **(text_cfg or {}))
    if pretrained is not None:
        return _install_pretrained_codecs(pretrained, pretrained_sha256 or {}, codec_dir, num_frames,
                                          height, width, logger)
    vae_clip_frames = num_frames if vae_clip_frames is None else vae_clip_frames
    if vae_crop_size is not None and vae_crop_size > min(height, width):
        vae_crop_size = None  # videos smaller than the crop: train on whole frames
    prepare_config = json.loads(json.dumps(dict(
        generator_version=GENERATOR_VERSION, vae_cfg=vae_cfg, num_frames=num_frames, height=height,
        width=width, seed=seed, num_train_videos=num_train_videos, steps=vae_steps, lr=vae_lr,
        batch_size=vae_batch_size, clip_frames=vae_clip_frames, crop_size=vae_crop_size)))
    metrics: Dict[str, object] = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as handle:
            metrics = json.load(handle)

    if _codec_config_matches(vae_path, 'vae', prepare_config):
        logger.info(f'prepare_tiny_codecs: reusing trained VAE {vae_path}')
    else:
        reason = 'no checkpoint' if not os.path.isfile(vae_path) else 'checkpoint built with another config'
        logger.info(f'prepare_tiny_codecs: training the tiny VAE ({reason}: {vae_path})')
        vae = TinyWanVAE(**vae_cfg)
        videos = render_training_videos(num_train_videos, num_frames, height, width, seed + 1_000_003)
        side = min(32, height, width)  # LSUV statistics: a small crop is enough
        vae.init_for_training(videos[:2, :, :min(5, num_frames), :side, :side])
        eval_videos = render_training_videos(8, num_frames, height, width, seed + 2_000_003)
        result = train_tiny_vae(vae, videos, steps=vae_steps, lr=vae_lr, batch_size=vae_batch_size,
                                clip_frames=vae_clip_frames, crop_size=vae_crop_size,
                                eval_videos=eval_videos, seed=seed, device=vae_device,
                                logger=logger, log_every=max(vae_steps // 6, 1))
        vae.save(vae_path, extra=dict(prepare_config=prepare_config, metrics=result))
        metrics['vae'] = result

    expected_text = dict(text_cfg, vocabulary=caption_vocabulary())
    if _codec_config_matches(text_path, 'text', expected_text):
        logger.info(f'prepare_tiny_codecs: reusing text encoder {text_path}')
    else:
        logger.info(f'prepare_tiny_codecs: building the tiny text encoder {text_path}')
        TinyTextEncoder(vocabulary=caption_vocabulary(), **text_cfg).save(text_path)
    write_json(metrics_path, metrics, indent=1)
    return dict(vae_checkpoint=vae_path, text_encoder_checkpoint=text_path,
                text_dim=int(text_cfg['dim']), metrics=metrics)


def _install_pretrained_codecs(assets: str, sha256: dict, codec_dir: str, num_frames: int, height: int,
                               width: int, logger: logging.Logger) -> Dict[str, object]:
    """``prepare_tiny_codecs(pretrained=...)``: verified shipped codecs → the codec ``.pth`` files."""
    from vdot_ext.models.tiny_codecs import DEMO_ASSETS_COMMAND, TinyTextEncoder, TinyWanVAE, verify_demo_asset
    vae_asset = verify_demo_asset(assets, 'vae', sha256.get('vae'))
    text_asset = verify_demo_asset(assets, 'text_encoder', sha256.get('text_encoder'))
    vae = TinyWanVAE.load_safetensors(vae_asset)
    made = json.loads(json.dumps(vae_extra(vae_asset)))
    prepare = made.get('prepare_config', {})
    expected = dict(generator_version=GENERATOR_VERSION, num_frames=num_frames, height=height, width=width)
    found = {k: prepare.get(k) for k in expected}
    if found != expected:
        raise ValueError(f'prepare_tiny_codecs.pretrained: {vae_asset} was trained on {found}, this recipe '
                         f'needs {expected}; regenerate the assets with `{DEMO_ASSETS_COMMAND}` or set '
                         'VDOT_DEMO_ASSETS=none to train from scratch')
    text_encoder = TinyTextEncoder.load_safetensors(text_asset)
    if text_encoder.tokenizer.words != caption_vocabulary():
        raise ValueError(f'prepare_tiny_codecs.pretrained: {text_asset} has another vocabulary than '
                         f'caption_vocabulary(); regenerate the assets with `{DEMO_ASSETS_COMMAND}`')
    vae_path = os.path.join(codec_dir, 'tiny_wan_vae.pth')
    text_path = os.path.join(codec_dir, 'tiny_text_encoder.pth')
    vae.save(vae_path, extra=dict(made, installed_from=vae_asset))
    text_encoder.save(text_path)
    metrics = dict(vae=made.get('metrics', {}), pretrained=dict(vae=vae_asset, text_encoder=text_asset))
    write_json(os.path.join(codec_dir, 'tiny_codecs.json'), metrics, indent=1)
    logger.info(f'prepare_tiny_codecs: installed the pretrained codecs {vae_asset} and {text_asset} '
                f'(SHA-256 verified; training options unused) as {vae_path}, {text_path}')
    return dict(vae_checkpoint=vae_path, text_encoder_checkpoint=text_path, text_dim=text_encoder.dim,
                metrics=metrics)


def vae_extra(path: str) -> dict:
    """The ``extra`` metadata (recipe, metrics) of a ``TinyWanVAE`` safetensors file."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as handle:
        return json.loads((handle.metadata() or {}).get('extra', '{}'))
