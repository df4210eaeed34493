"""``VCUManifestDataset``: manifest rows → encoded VCU training samples.

Per sample (``__getitem__``) the trainer gets (``VDOTDistiller`` batch keys)::

    prompt, task, num_ref, index
    sample_id         '<id> (<manifest file> line <n>)': names the sample in logs
    context           [L, text_dim]                       text embedding (umT5 / tiny)
    latents           [16, n_ref + F_lat, H/8, W/8]       VAE latents of the ground-truth
                                                          video, reference latents prepended
    vace_context      [96, n_ref + F_lat, H/8, W/8]       ``encode_vcu`` of (F, M, refs)
    negative_context  [L, text_dim]                       when a negative prompt is set

with ``F_lat = (num_frames − 1)/4 + 1``. The pixels (``get_vcu``) come from
:mod:`.video_reader` and the builders of :mod:`.tasks`.

Encoded tensors come from, in order:

1. **the cache** (``cache_dir``; :class:`~.vcu_cache.VCUCache`), written by
   ``python -m vdot_ext.tools.precompute_vcu`` or by this dataset. Its key covers
   the pixel configuration (with ``data_version`` and the conditions'
   ``CONDITION_VERSION``) and the codecs; a cache for another configuration is
   never used, the error names the keys that differ and the command that
   rebuilds it. Every file is checked on load (hashes, shapes, finite values).
2. **the codecs** (``codec=dict(vae=..., text_encoder=..., device=...)``;
   :class:`~.vcu_codecs.VCUCodecs`): encode on the fly (and write the cache
   when ``cache_dir`` is set).

With neither, construction fails with an error saying what to set.

Bad samples (docs/DESIGN.md §11): a bad manifest row (non-UTF-8 bytes, malformed
JSON, non-finite numbers, a prompt that is not a string, missing files ...), an
unreadable or short video, mismatched mask/condition, NaN in the cache or the
encoder output. With ``on_error='raise'`` (default) each raises
:class:`VCUInputError` naming sample, field and file. With ``on_error='skip'``:

* bad manifest rows are dropped at construction, counted in ``num_skipped``,
  listed in ``bad_samples``/``manifest_errors`` and summarised in one warning;
* a sample that turns out bad when read is logged once (per process), counted,
  and replaced, deterministically, by the next good sample of its shape group
  (same ``shape_key``, manifest order, cyclic). When every sample of that group
  is bad, by a good sample of the first other group (in manifest order) that has
  one, the same group for every index of the dead group: the batches of
  ``ShapeGroupedBatchSampler`` hold one group each, so they stay uniform in
  shape and collate. Only a manifest whose every sample is bad raises.

Counts live per process: DataLoader workers count their own skips.
"""
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from vdot_ext.registry import DATASETS

from . import tasks as vcu_tasks
from .manifest import ManifestRow, parse_manifest, summarize_errors
from .tasks import TASKS, SourceSample, VCUPixels, build_vcu, merge_options
from .vcu_cache import (
    CACHE_DTYPES,
    REBUILD_TOOL,
    NonFiniteSampleError,
    VCUCache,
    first_nonfinite,
    pixel_hash,
    sample_key,
)
from .vcu_codecs import TEXT_ENCODER_TYPES, VAE_TYPES, UMT5PromptEncoder, VCUCodecs, file_fingerprint
from .video_reader import (
    RESIZE_MODES,
    SHRINK_INTERPOLATIONS,
    VCUInputError,
    open_video,
    read_image,
    read_mask,
    read_video_frames,
    sample_frame_indices,
)

# re-exported: configs, tools and user code import these from here
__all__ = ['VCUManifestDataset', 'VCUCodecs', 'UMT5PromptEncoder', 'VCUCache', 'NonFiniteSampleError',
           'VCUInputError', 'file_fingerprint', 'CACHE_DTYPES', 'VAE_TYPES', 'TEXT_ENCODER_TYPES',
           'DATA_VERSION']

logger = logging.getLogger(__name__)

# bump when readers change what pixels a configuration produces (the condition
# builders have their own version, tasks.CONDITION_VERSION; both are in the cache key)
DATA_VERSION = 1


@DATASETS.register_module()
class VCUManifestDataset(Dataset):
    """Multi-task VCU training data from a CSV/JSONL manifest (see module doc).

    Args:
        manifest: CSV/TSV/JSONL path (:mod:`.manifest` describes the columns).
        num_frames, height, width: clip geometry (4k+1 frames; multiples of 16).
        cache_dir: encoded-tensor cache (see module doc); None = no cache.
        codec: ``dict(vae=..., text_encoder=..., device=...)`` (see
            :class:`VCUCodecs`); None = cache only.
        frame_stride: take every ``frame_stride``-th frame (ignored with ``fps``).
        fps: resample the clip to this frame rate instead of a fixed stride.
        resize_mode: ``'cover'`` (scale keeping aspect, centre crop) or ``'stretch'``.
        resize_shrink: ``'area'`` (default) or ``'linear'`` (cheaper) interpolation
            when the source is larger than the target.
        on_short: ``'error'`` or ``'pad'`` (repeat the last frame, logged).
        task_options: defaults for the task options (``tasks.DEFAULT_OPTIONS``);
            a row's own options win.
        negative_prompt: encoded as ``negative_context`` for every sample (a
            row's ``negative_prompt`` wins); None = none.
        on_error: ``'raise'`` or ``'skip'`` bad samples (see module doc).
        write_cache: write encoded samples to ``cache_dir`` when encoding.
        cache_dtype: storage dtype of cached tensors (returned as float32).
        seed: seeds per-sample random choices (random clip position).
        check_files: check at construction that every referenced file exists.
        decode_threads: decord decoding threads per reader (1 per worker).
        pixels_only: only ``get_vcu``/``build_pixels`` (inspection, checks, the
            pixel benchmark); no cache or codec needed, ``__getitem__`` refuses.
    """

    def __init__(self,
                 manifest: str,
                 num_frames: int = 81,
                 height: int = 480,
                 width: int = 832,
                 cache_dir: Optional[str] = None,
                 codec: Optional[dict] = None,
                 frame_stride: int = 1,
                 fps: Optional[float] = None,
                 resize_mode: str = 'cover',
                 resize_shrink: str = 'area',
                 on_short: str = 'error',
                 task_options: Optional[dict] = None,
                 negative_prompt: Optional[str] = None,
                 on_error: str = 'raise',
                 write_cache: bool = True,
                 cache_dtype: str = 'float32',
                 seed: int = 0,
                 check_files: bool = True,
                 decode_threads: int = 1,
                 pixels_only: bool = False):
        super().__init__()
        if (int(num_frames) - 1) % 4 or int(num_frames) < 1:
            raise ValueError(f'VCUManifestDataset.num_frames={num_frames}: must be 4k+1 (Wan VAE)')
        if int(height) % 16 or int(width) % 16:
            raise ValueError(f'VCUManifestDataset.height/width={height}/{width}: must be '
                             'multiples of 16 (8× VAE, 2×2 DiT patches)')
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f'VCUManifestDataset.resize_mode: expected one of {RESIZE_MODES}, '
                             f'got {resize_mode!r}')
        if resize_shrink not in SHRINK_INTERPOLATIONS:
            raise ValueError(f'VCUManifestDataset.resize_shrink: expected one of '
                             f'{SHRINK_INTERPOLATIONS}, got {resize_shrink!r}')
        if on_short not in ('error', 'pad'):
            raise ValueError(f"VCUManifestDataset.on_short: 'error' or 'pad', got {on_short!r}")
        if on_error not in ('raise', 'skip'):
            raise ValueError(f"VCUManifestDataset.on_error: 'raise' or 'skip', got {on_error!r}")
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f'VCUManifestDataset.cache_dtype: one of {sorted(CACHE_DTYPES)}, '
                             f'got {cache_dtype!r}')
        if fps is not None and float(fps) <= 0:
            raise ValueError(f'VCUManifestDataset.fps must be > 0, got {fps}')
        if int(frame_stride) < 1:
            raise ValueError(f'VCUManifestDataset.frame_stride must be ≥ 1, got {frame_stride}')
        self.manifest = os.path.abspath(manifest)
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.frame_stride = int(frame_stride)
        self.fps = None if fps is None else float(fps)
        self.resize_mode, self.on_short, self.on_error = resize_mode, on_short, on_error
        self.resize_shrink = resize_shrink
        self.task_options = merge_options(task_options)
        self.negative_prompt = negative_prompt
        self.write_cache = bool(write_cache)
        self.cache_dtype = cache_dtype
        self.seed = int(seed)
        self.decode_threads = int(decode_threads)
        self.pixels_only = bool(pixels_only)
        self.bad_samples: Dict[str, str] = {}  # sample_id → why it was skipped
        self.num_skipped = 0
        self.num_encoded = 0

        self.rows, self.manifest_errors = parse_manifest(self.manifest, check_files=check_files,
                                                         skip_bad=on_error == 'skip')
        for exc in self.manifest_errors:
            self.bad_samples[exc.sample or str(exc)] = str(exc)
        self.num_skipped += len(self.manifest_errors)
        if not self.rows:
            raise VCUInputError(f'no usable rows ({summarize_errors(self.manifest_errors)})',
                                field='manifest', path=self.manifest)

        self.codecs = VCUCodecs(**codec) if codec is not None else None
        self.pixel_config = dict(
            data_version=DATA_VERSION, condition_version=vcu_tasks.CONDITION_VERSION,
            num_frames=self.num_frames, height=self.height, width=self.width,
            frame_stride=None if self.fps else self.frame_stride, fps=self.fps,
            resize_mode=self.resize_mode, resize_shrink=self.resize_shrink, on_short=self.on_short,
            task_options={k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in self.task_options.items()},
            negative_prompt=self.negative_prompt, seed=self.seed, cache_dtype=self.cache_dtype)
        self.cache_dir = None if cache_dir is None else os.path.abspath(cache_dir)
        self.cache = self._open_cache()
        self.pixel_hash = pixel_hash(self.pixel_config)
        self._sample_keys: Dict[int, str] = {}
        self._groups: Optional[Dict[object, List[int]]] = None
        self._group_pos: Dict[int, int] = {}
        self._warned = set()

    # ------------------------------------------------------------ cache
    def _open_cache(self) -> Optional[VCUCache]:
        if self.pixels_only:
            return None
        if self.cache_dir is None:
            if self.codecs is None:
                raise ValueError('VCUManifestDataset: neither cache_dir nor codec is set: set '
                                 'codec=dict(vae=..., text_encoder=...) to encode, or cache_dir to '
                                 f'a cache made by `{REBUILD_TOOL}`')
            return None
        return VCUCache(self.cache_dir, self.pixel_config,
                        self.codecs.identity if self.codecs else None, self.manifest)

    @property
    def cache_subdir(self) -> Optional[str]:
        """The cache folder of this configuration (None without a cache)."""
        return None if self.cache is None else self.cache.folder

    def sample_key(self, index: int) -> str:
        if index not in self._sample_keys:
            self._sample_keys[index] = sample_key(self.rows[index].key_dict())
        return self._sample_keys[index]

    def cache_path(self, index: int) -> Optional[str]:
        return None if self.cache is None else self.cache.path(self.sample_key(index))

    def skip_report(self) -> str:
        """How many samples this process skipped so far, and why (first few)."""
        if not self.bad_samples:
            return 'VCUManifestDataset: no samples skipped'
        first = ' | '.join(list(self.bad_samples.values())[:3])
        return (f'VCUManifestDataset: {self.num_skipped} sample(s) skipped '
                f'({len(self.manifest_errors)} at parsing); first: {first}')

    # ------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.rows)

    def shape_key(self, index: int) -> int:
        """Number of reference frames (what changes the tensor shapes)."""
        return self.rows[index].num_ref

    def sample_id(self, index: int) -> str:
        """``'<id> (<manifest file> line <n>)'``, the item's ``sample_id``."""
        return self.rows[index].describe()

    def _warn_once(self, key, message: str) -> bool:
        if key in self._warned:
            return False
        self._warned.add(key)
        logger.warning(message)
        return True

    def _prompts(self, row: ManifestRow):
        return row.prompt, row.negative_prompt or self.negative_prompt

    # ------------------------------------------------------------ pixels
    def load_source(self, index: int) -> SourceSample:
        """Read the files of sample ``index`` at the target geometry."""
        row = self.rows[index]
        sid = row.describe()
        spec = TASKS[row.task]
        threads = self.decode_threads
        reader, info = open_video(row.video, 'video', sid, threads)
        indices = sample_frame_indices(info.num_frames, self.num_frames, self.frame_stride,
                                       self.fps, info.fps, row.frame_start, row.frame_end,
                                       self.on_short, row.video, sid)
        shrink = self.resize_shrink
        video, geometry = read_video_frames(row.video, indices, self.height, self.width,
                                            self.resize_mode, 'video', sid, reader=reader,
                                            shrink=shrink)
        del reader
        uses_condition = spec.control is not None or row.task in ('outpaint', 'inpaint')
        condition = mask = None
        if row.condition is not None:
            if uses_condition:
                condition, _ = read_video_frames(row.condition, indices, self.height, self.width,
                                                 self.resize_mode, 'condition', sid, expect=info,
                                                 num_threads=threads, shrink=shrink)
            else:
                self._warn_once((row.task, 'condition'),
                                f'sample {sid}: task {row.task!r} does not use field '
                                "'condition'; ignoring it (logged once per task)")
        if row.mask is not None:
            if spec.uses_mask:
                mask = read_mask(row.mask, indices, self.height, self.width, self.resize_mode,
                                 sid, expect=info, num_threads=threads, shrink=shrink)
            else:
                self._warn_once((row.task, 'mask'),
                                f'sample {sid}: task {row.task!r} does not use field \'mask\' '
                                '(its masks are fixed by Table 1); ignoring it (logged once per '
                                'task)')
        refs = None
        if spec.uses_refs and row.ref_images:
            refs = [read_image(p, 'ref_images', sid) for p in row.ref_images]
        box = ref_box = None
        if row.box is not None:
            box = geometry.map_box(row.box)
        if row.ref_box is not None:
            ref_box = geometry.map_box(row.ref_box)
        rng = np.random.default_rng([self.seed, int(self.sample_key(index)[:12], 16)])
        return SourceSample(sid, video, condition, mask, refs, box, ref_box, row.ref_frame, rng)

    def build_pixels(self, index: int) -> VCUPixels:
        row = self.rows[index]
        source = self.load_source(index)
        # merged inside build_vcu, so that an option error names the sample
        pixels = build_vcu(row.task, source, dict(self.task_options, **row.options))
        if pixels.num_ref != row.num_ref:
            raise VCUInputError(f'built {pixels.num_ref} references, the manifest row implies '
                                f'{row.num_ref}', row.describe(), 'ref_images')
        return pixels

    def get_vcu(self, index: int) -> Dict[str, object]:
        """Pixel-level VCU of sample ``index``: ``video``/``frames`` ``[3, T, H, W]``
        in [-1, 1] (grey 0 = missing), ``masks`` ``[1, T, H, W]`` in {0, 1},
        ``ref_images`` ``[3, n_ref, H, W]`` or None, ``prompt``, ``task``, ``num_ref``."""
        row = self.rows[index]
        p = self.build_pixels(index)
        return dict(video=p.video_tensor(), frames=p.frames_tensor(), masks=p.masks_tensor(),
                    ref_images=p.ref_images, prompt=row.prompt, task=row.task,
                    num_ref=p.num_ref, sample_id=row.describe(), info=p.info)

    # ------------------------------------------------------------ encoded
    def _expected_shapes(self, num_ref: int):
        f = num_ref + (self.num_frames - 1) // 4 + 1
        h, w = self.height // 8, self.width // 8
        return dict(latents=(16, f, h, w), vace_context=(96, f, h, w))

    def load_cached(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        """The cached tensors of ``index`` (float32) or None when not cached."""
        if self.cache is None:
            return None
        row = self.rows[index]
        return self.cache.load(self.sample_key(index), self._expected_shapes(row.num_ref),
                               row.describe())

    def save_cached(self, index: int, encoded: Dict[str, torch.Tensor]) -> str:
        row = self.rows[index]
        meta = dict(sample_id=row.sample_id, task=row.task, num_ref=row.num_ref, prompt=row.prompt)
        return self.cache.save(self.sample_key(index), encoded, CACHE_DTYPES[self.cache_dtype], meta,
                               row.describe())

    def encode_indices(self, indices: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        """Encode samples (same ``shape_key``) in one batch with the codecs."""
        if self.codecs is None:
            row = self.rows[indices[0]]
            # a VCUInputError: a sample that precompute skipped is skipped here too
            raise VCUInputError(f'no cache entry and no codec configured. {self.cache.rebuild_hint()}',
                                row.describe(), 'cache', self.cache_path(indices[0]))
        return self.encode_pixels(indices, [self.build_pixels(i) for i in indices])

    def encode_pixels(self, indices: Sequence[int], pixels: Sequence[VCUPixels]
                      ) -> List[Dict[str, torch.Tensor]]:
        """Encode already built pixels of ``indices`` (same ``shape_key``) in one batch."""
        if self.codecs is None:
            raise ValueError('VCUManifestDataset.encode_pixels: no codec configured')
        prompts = [self._prompts(self.rows[i]) for i in indices]
        negatives = [n for _, n in prompts]
        encoded = self.codecs.encode(pixels, [p for p, _ in prompts],
                                     negatives if any(n is not None for n in negatives) else None)
        self.num_encoded += len(indices)
        return encoded

    def _item(self, index: int, tensors: Dict[str, torch.Tensor]) -> Dict[str, object]:
        row = self.rows[index]
        item = dict(prompt=row.prompt, task=row.task, num_ref=row.num_ref, index=index,
                    sample_id=row.describe(), context=tensors['context'],
                    latents=tensors['latents'], vace_context=tensors['vace_context'])
        if 'negative_context' in tensors:
            item['negative_context'] = tensors['negative_context']
        return item

    def fetch(self, index: int) -> Dict[str, object]:
        """Sample ``index`` from the cache, else encoded (and cached); raises on bad input."""
        tensors = self.load_cached(index)
        if tensors is None:
            tensors = self.encode_indices([index])[0]
            if self.cache is not None and self.write_cache:
                self.save_cached(index, tensors)  # refuses (raises) non-finite tensors
            else:
                bad = first_nonfinite(tensors)
                if bad:
                    raise NonFiniteSampleError(f'encoder produced {bad[1]} NaN/Inf values in '
                                               f'{bad[0]!r}', self.rows[index].describe(), bad[0],
                                               self.rows[index].video)
        return self._item(index, tensors)

    # ------------------------------------------------------------ skip mode
    def _shape_groups(self) -> Dict[object, List[int]]:
        """Indices per ``shape_key`` in manifest order (groups in order of appearance)."""
        if self._groups is None:
            self._groups = {}
            for i in range(len(self.rows)):
                members = self._groups.setdefault(self.shape_key(i), [])
                self._group_pos[i] = len(members)
                members.append(i)
        return self._groups

    def substitutes(self, index: int) -> Iterator[int]:
        """``index``, then the candidates that replace it when it is bad (see module
        doc): the rest of its shape group cyclically from ``index``, then each other
        group cyclically from the offset of ``index`` within its own group."""
        groups = self._shape_groups()
        key = self.shape_key(index)
        own, pos = groups[key], self._group_pos[index]
        for step in range(len(own)):
            yield own[(pos + step) % len(own)]
        for other, members in groups.items():
            if other == key:
                continue
            self._warn_once(('dead group', key),
                            f'VCUManifestDataset: every sample with shape key {key!r} is bad '
                            f'({len(own)} samples); they are replaced by samples of the next '
                            'shape group that has good ones, so shape-grouped batches stay '
                            f'uniform. {self.skip_report()}')
            start = pos % len(members)
            for step in range(len(members)):
                yield members[(start + step) % len(members)]

    def _mark_bad(self, sid: str, exc: Exception) -> None:
        self.bad_samples[sid] = str(exc)
        self.num_skipped += 1
        logger.warning(f'VCUManifestDataset: skipping bad sample ({self.num_skipped} skipped so '
                       f'far in this process): {exc}')

    def __getitem__(self, index: int) -> Dict[str, object]:
        index = int(index)
        if self.pixels_only:
            raise RuntimeError('VCUManifestDataset(pixels_only=True) has no encoded samples; use '
                               'get_vcu(index), or set cache_dir/codec')
        if not 0 <= index < len(self.rows):
            raise IndexError(f'VCUManifestDataset: index {index} out of range [0, {len(self.rows)})')
        if self.on_error == 'raise':
            return self.fetch(index)
        for candidate in self.substitutes(index):
            sid = self.rows[candidate].describe()
            if sid in self.bad_samples:
                continue
            try:
                return self.fetch(candidate)
            except VCUInputError as exc:  # includes NonFiniteSampleError; codec faults propagate
                self._mark_bad(sid, exc)
        raise VCUInputError(f'every sample of the manifest is bad ({len(self.rows)} usable rows, '
                            f'all failed when read). {self.skip_report()}', field='manifest',
                            path=self.manifest)
