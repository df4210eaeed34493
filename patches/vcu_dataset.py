"""``VCUManifestDataset``: manifest rows → encoded VCU training samples.

Per sample (``__getitem__``) the trainer gets (``VDOTDistiller`` batch keys)::

    prompt, task, num_ref, index, sample_id
    context           [L, text_dim]                       text embedding (umT5 / tiny)
    latents           [16, n_ref + F_lat, H/8, W/8]       VAE latents of the ground-truth
                                                          video, reference latents prepended
    vace_context      [96, n_ref + F_lat, H/8, W/8]       ``encode_vcu`` of (F, M, refs)
    negative_context  [L, text_dim]                       when a negative prompt is set

with ``F_lat = (num_frames − 1)/4 + 1``. The pixels (``get_vcu``) come from
:mod:`.video_reader` and the builders of :mod:`.tasks`.

Encoded tensors come from, in order:

1. **the cache** (``cache_dir``), written by ``python -m vdot_ext.tools.precompute_vcu``
   or by this dataset: ``<cache_dir>/<pixel-hash>_<codec-hash>/`` holds
   ``config.json`` and one ``<sample-key>.safetensors`` per sample. The pixel
   hash covers everything that changes F/M/refs/video (frames, size, sampling,
   resize, task options, seed, data version), the codec hash the VAE and text
   encoder (type + checkpoint fingerprint). A cache for another configuration
   is never used; the error names the keys that differ. Every file is checked on
   load (its stored hashes, tensor shapes, finite values).
2. **the codecs** (``codec=dict(vae=..., text_encoder=..., device=...)``):
   encode on the fly (and write the cache when ``cache_dir`` is set).

With neither, construction fails with an error saying what to set.

Bad samples (unreadable video, too few frames, mismatched mask/condition,
missing references, unknown task, empty prompt, NaN in the cache) raise
:class:`VCUInputError` naming sample, field and file. With ``on_error='skip'``
they are skipped instead: counted in ``num_skipped``, logged once each (per
process), and replaced by the next sample with the same ``shape_key``.
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

from vdot_ext.registry import DATASETS

from .manifest import ManifestRow, parse_manifest
from .tasks import TASKS, SourceSample, VCUPixels, build_vcu, merge_options
from .video_reader import (RESIZE_MODES, SHRINK_INTERPOLATIONS, VCUInputError, open_video, read_image, read_mask,
                           read_video_frames, sample_frame_indices)

logger = logging.getLogger(__name__)

# bump when readers/builders change what pixels a configuration produces
DATA_VERSION = 1
VAE_TYPES = ('TinyWanVAE', 'WanVideoVAE')
TEXT_ENCODER_TYPES = ('TinyTextEncoder', 'WanTextEncoder')
CACHE_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """size + sha256 of the first and last MiB (cheap for multi-GB checkpoints)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, 'rb') as handle:
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(chunk, size - chunk))
            digest.update(handle.read(chunk))
    return f'{size}:{digest.hexdigest()[:32]}'


# ------------------------------------------------------------------ codecs
class UMT5PromptEncoder:
    """diffsynth ``WanTextEncoder`` (umT5-xxl) + ``HuggingfaceTokenizer`` from local
    files, zeroing embeddings past each prompt's length (diffsynth
    ``WanVideoUnit_PromptEmbedder.encode_prompt``, per row)."""

    def __init__(self, checkpoint: str, tokenizer: str, seq_len: int = 512,
                 device: str = 'cpu', dtype: torch.dtype = torch.bfloat16):
        from diffsynth.core.loader.model import load_model
        from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
        if not tokenizer or not os.path.isdir(tokenizer):
            raise FileNotFoundError(f'codec.text_encoder.tokenizer: {tokenizer!r} is not a local '
                                    'folder with the umT5 tokenizer (google/umt5-xxl files)')
        self.model = load_model(WanTextEncoder, checkpoint, torch_dtype=dtype, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = HuggingfaceTokenizer(name=tokenizer, seq_len=seq_len, clean='whitespace')
        self.device = device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(list(prompts), return_mask=True, add_special_tokens=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        lengths = mask.gt(0).sum(dim=1).long()
        emb = self.model(ids, mask)
        for row, length in enumerate(lengths):
            emb[row, length:] = 0
        return emb.float().cpu()


class VCUCodecs:
    """Frozen VAE + text encoder, built from ``codec`` configs::

        codec = dict(
            vae=dict(type='TinyWanVAE', checkpoint='tiny_wan_vae.pth'),
            # or dict(type='WanVideoVAE', checkpoint='Wan2.1_VAE.pth')
            text_encoder=dict(type='TinyTextEncoder', checkpoint='tiny_text_encoder.pth'),
            # or dict(type='WanTextEncoder', checkpoint='models_t5_umt5-xxl-enc-bf16.pth',
            #         tokenizer='/ckpt/google/umt5-xxl', seq_len=512)
            device='cpu')

    The VAE runs in float32 (``encode_vcu`` feeds float32 pixels).
    """

    def __init__(self, vae: dict, text_encoder: dict, device: str = 'cpu'):
        for name, cfg, types in (('vae', vae, VAE_TYPES),
                                 ('text_encoder', text_encoder, TEXT_ENCODER_TYPES)):
            if not isinstance(cfg, dict) or cfg.get('type') not in types:
                raise ValueError(f'codec.{name}: expected dict(type=one of {types}, '
                                 f'checkpoint=...), got {cfg!r}')
            if not cfg.get('checkpoint') or not os.path.isfile(cfg['checkpoint']):
                raise FileNotFoundError(f'codec.{name}.checkpoint: no file at '
                                        f'{cfg.get("checkpoint")!r}')
        self.device = device
        self.vae_cfg, self.text_cfg = dict(vae), dict(text_encoder)
        self.identity = dict(
            vae=dict(self.vae_cfg, checkpoint=file_fingerprint(vae['checkpoint'])),
            text_encoder=dict(self.text_cfg, checkpoint=file_fingerprint(text_encoder['checkpoint']),
                              tokenizer=None))
        self._vae = None
        self._text = None

    @property
    def vae(self):
        if self._vae is None:
            cfg = self.vae_cfg
            if cfg['type'] == 'TinyWanVAE':
                from vdot_ext.models.tiny_codecs import TinyWanVAE
                self._vae = TinyWanVAE.load(cfg['checkpoint']).to(self.device)
            else:
                from diffsynth.core.loader.model import load_model
                from diffsynth.models.wan_video_vae import WanVideoVAE
                from diffsynth.utils.state_dict_converters.wan_video_vae import \
                    WanVideoVAEStateDictConverter
                self._vae = load_model(WanVideoVAE, cfg['checkpoint'], torch_dtype=torch.float32,
                                       device=self.device,
                                       state_dict_converter=WanVideoVAEStateDictConverter)
                self._vae.eval().requires_grad_(False)
        return self._vae

    @property
    def text_encoder(self):
        if self._text is None:
            cfg = self.text_cfg
            if cfg['type'] == 'TinyTextEncoder':
                from vdot_ext.models.tiny_codecs import TinyTextEncoder
                self._text = TinyTextEncoder.load(cfg['checkpoint'])
            else:
                self._text = UMT5PromptEncoder(cfg['checkpoint'], cfg.get('tokenizer'),
                                               int(cfg.get('seq_len', 512)), self.device)
        return self._text

    def __getstate__(self):  # DataLoader workers rebuild the models lazily
        state = dict(self.__dict__)
        state['_vae'] = state['_text'] = None
        return state

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(prompts)).float().cpu()

    @torch.no_grad()
    def encode_video(self, videos: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` → normalised latents ``[B, 16, F_lat, H/8, W/8]``
        (diffsynth ``WanVideoVAE.encode``)."""
        wan_vae = getattr(self.vae, 'wan_vae', self.vae)
        return wan_vae.encode(videos.float(), device=self.device).float().cpu()

    @torch.no_grad()
    def encode(self, pixels: Sequence[VCUPixels], prompts: Sequence[str],
               negative_prompts: Optional[Sequence[Optional[str]]] = None) -> List[Dict[str, torch.Tensor]]:
        """Encode samples with the same ``num_ref`` in one batch."""
        from .vcu import encode_vcu
        if len({p.num_ref for p in pixels}) != 1:
            raise ValueError('VCUCodecs.encode: a batch must share num_ref '
                             f'(got {[p.num_ref for p in pixels]})')
        # uint8 → float on the codec's device (the float clips are 4× larger)
        dev = self.device
        videos = torch.stack([p.video_tensor(dev) for p in pixels])
        latents = self.encode_video(videos)
        refs = None
        if pixels[0].num_ref:
            refs = torch.stack([p.ref_images for p in pixels]).to(dev)  # [B, 3, n_ref, H, W]
            b, _, n, h, w = refs.shape
            # each reference is its own 1-frame video, as in diffsynth's VACE unit
            ref_lat = self.encode_video(refs.permute(0, 2, 1, 3, 4).reshape(b * n, 3, 1, h, w))
            ref_lat = ref_lat.reshape(b, n, *ref_lat.shape[1:])[:, :, :, 0].permute(0, 2, 1, 3, 4)
            latents = torch.cat([ref_lat, latents], dim=2)
        frames = torch.stack([p.frames_tensor(dev) for p in pixels])
        masks = torch.stack([p.masks_tensor(dev) for p in pixels])
        vace = encode_vcu(self.vae, frames, masks, refs).float().cpu()
        context = self.encode_text(prompts)
        out = []
        negative = None
        if negative_prompts is not None and any(n is not None for n in negative_prompts):
            if any(n is None for n in negative_prompts):
                raise ValueError('VCUCodecs.encode: negative prompts must be all set or all None')
            negative = self.encode_text(negative_prompts)
        for k in range(len(pixels)):
            item = dict(context=context[k], latents=latents[k], vace_context=vace[k])
            if negative is not None:
                item['negative_context'] = negative[k]
            out.append(item)
        return out


# ------------------------------------------------------------------ dataset
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
        on_error: ``'raise'`` or ``'skip'`` bad samples.
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
        self.bad_samples: Dict[str, str] = {}
        self.num_skipped = 0
        self.num_encoded = 0

        self.rows, manifest_errors = parse_manifest(self.manifest, check_files=check_files,
                                                    skip_bad=on_error == 'skip')
        for exc in manifest_errors:
            self.bad_samples[getattr(exc, 'sample_id', None) or exc.sample or str(exc)] = str(exc)
        self.num_skipped += len(manifest_errors)
        if not self.rows:
            raise VCUInputError('no usable rows', field='manifest', path=self.manifest)

        self.codecs = VCUCodecs(**codec) if codec is not None else None
        self.pixel_config = dict(
            data_version=DATA_VERSION, num_frames=self.num_frames, height=self.height,
            width=self.width, frame_stride=None if self.fps else self.frame_stride, fps=self.fps,
            resize_mode=self.resize_mode, resize_shrink=self.resize_shrink, on_short=self.on_short,
            task_options={k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in self.task_options.items()},
            negative_prompt=self.negative_prompt, seed=self.seed, cache_dtype=self.cache_dtype)
        self.pixel_hash = _sha(self.pixel_config)[:16]
        self.cache_dir = None if cache_dir is None else os.path.abspath(cache_dir)
        self.cache_subdir = self._resolve_cache_subdir()
        self._sample_keys: Dict[int, str] = {}
        self._groups: Optional[Dict[int, List[int]]] = None
        self._warned = set()

    # ------------------------------------------------------------ cache dirs
    def _resolve_cache_subdir(self) -> Optional[str]:
        if self.pixels_only:
            return None
        if self.cache_dir is None:
            if self.codecs is None:
                raise ValueError('VCUManifestDataset: neither cache_dir nor codec is set: set '
                                 'codec=dict(vae=..., text_encoder=...) to encode, or cache_dir to '
                                 'a cache made by `python -m vdot_ext.tools.precompute_vcu`')
            return None
        if self.codecs is not None:
            codec_hash = _sha(self.codecs.identity)[:8]
            sub = os.path.join(self.cache_dir, f'{self.pixel_hash}_{codec_hash}')
            self._check_config_file(sub)
            return sub
        candidates = []
        if os.path.isdir(self.cache_dir):
            candidates = sorted(d for d in os.listdir(self.cache_dir)
                                if d.startswith(self.pixel_hash + '_')
                                and os.path.isfile(os.path.join(self.cache_dir, d, 'config.json')))
        if len(candidates) == 1:
            sub = os.path.join(self.cache_dir, candidates[0])
            stored = self._check_config_file(sub)
            logger.info(f'VCUManifestDataset: using cache {sub} (codecs: '
                        f'{json.dumps(stored.get("codec"), default=str)})')
            return sub
        if len(candidates) > 1:
            raise ValueError(f'VCUManifestDataset: {self.cache_dir} holds caches of this pixel '
                             f'configuration for several codecs ({candidates}); set codec=... to '
                             'pick one')
        raise ValueError(
            f'VCUManifestDataset: no cache for this configuration in {self.cache_dir} and no codec '
            f'configured. {self._describe_other_caches()}Run `python -m vdot_ext.tools.precompute_vcu '
            f'{self.manifest} --cache-dir {self.cache_dir} ...` with the same settings, or set codec=...')

    def _describe_other_caches(self) -> str:
        if not self.cache_dir or not os.path.isdir(self.cache_dir):
            return ''
        notes = []
        for d in sorted(os.listdir(self.cache_dir)):
            path = os.path.join(self.cache_dir, d, 'config.json')
            if not os.path.isfile(path):
                continue
            with open(path) as handle:
                other = json.load(handle).get('pixel_config', {})
            diff = sorted(k for k in set(other) | set(self.pixel_config)
                          if other.get(k) != self.pixel_config.get(k))
            notes.append(f'{d} differs in {diff}')
        return f'Caches there were built for other settings: {"; ".join(notes)}. ' if notes else ''

    def _check_config_file(self, sub: str) -> dict:
        path = os.path.join(sub, 'config.json')
        if not os.path.isfile(path):
            return {}
        with open(path) as handle:
            stored = json.load(handle)
        if stored.get('pixel_config') != json.loads(json.dumps(self.pixel_config, default=str)):
            raise ValueError(f'{path}: stored pixel configuration differs from this dataset\'s '
                             '(corrupt or hand-edited cache); delete the folder to rebuild')
        return stored

    def _write_config_file(self) -> None:
        os.makedirs(self.cache_subdir, exist_ok=True)
        path = os.path.join(self.cache_subdir, 'config.json')
        if os.path.isfile(path):
            return
        payload = dict(pixel_config=self.pixel_config,
                       codec=self.codecs.identity if self.codecs else None,
                       manifest=self.manifest, created=time.strftime('%Y-%m-%d %H:%M:%S'))
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w') as handle:
            json.dump(payload, handle, indent=1, default=str)
        os.replace(tmp, path)

    def sample_key(self, index: int) -> str:
        if index not in self._sample_keys:
            self._sample_keys[index] = _sha(self.rows[index].key_dict())[:24]
        return self._sample_keys[index]

    def cache_path(self, index: int) -> Optional[str]:
        if self.cache_subdir is None:
            return None
        return os.path.join(self.cache_subdir, f'{self.sample_key(index)}.safetensors')

    # ------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.rows)

    def shape_key(self, index: int) -> int:
        """Number of reference frames (what changes the tensor shapes)."""
        return self.rows[index].num_ref

    def _warn_once(self, key, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

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
        pixels = build_vcu(row.task, source, merge_options(self.task_options, row.options))
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
                    num_ref=p.num_ref, sample_id=row.sample_id, info=p.info)

    # ------------------------------------------------------------ encoded
    def _expected_shapes(self, num_ref: int):
        f = num_ref + (self.num_frames - 1) // 4 + 1
        h, w = self.height // 8, self.width // 8
        return dict(latents=(16, f, h, w), vace_context=(96, f, h, w))

    def load_cached(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        """The cached tensors of ``index`` (float32) or None when not cached."""
        from safetensors import safe_open
        path = self.cache_path(index)
        if path is None or not os.path.isfile(path):
            return None
        row = self.rows[index]
        sid = row.describe()
        try:
            with safe_open(path, framework='pt') as handle:
                meta = json.loads((handle.metadata() or {}).get('vcu', '{}'))
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:
            raise VCUInputError(f'unreadable cache file ({type(exc).__name__}: {exc})', sid,
                                'cache', path) from None
        if meta.get('pixel_hash') != self.pixel_hash or meta.get('sample_key') != self.sample_key(index):
            raise VCUInputError(f'cache file was written for another configuration or sample '
                                f'(stored {meta.get("pixel_hash")}/{meta.get("sample_key")}, '
                                f'expected {self.pixel_hash}/{self.sample_key(index)})',
                                sid, 'cache', path)
        expected = self._expected_shapes(row.num_ref)
        for name in ('context', 'latents', 'vace_context'):
            if name not in tensors:
                raise VCUInputError(f'cache file lacks tensor {name!r}', sid, name, path)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise VCUInputError(f'cached {name} has shape {tuple(tensors[name].shape)}, '
                                    f'expected {shape}', sid, name, path)
        for name, tensor in tensors.items():
            # one reduction instead of a clip-sized bool mask (≈10× faster on
            # 64 MiB samples); any NaN/Inf makes the sum non-finite
            if not bool(torch.isfinite(tensor.sum())):
                bad = int((~torch.isfinite(tensor)).sum())  # 0 if the sum merely overflowed
                if bad:
                    raise VCUInputError(f'cached tensor {name!r} has {bad} NaN/Inf values', sid,
                                        name, path)
        return {k: v.float() for k, v in tensors.items()}

    def save_cached(self, index: int, encoded: Dict[str, torch.Tensor]) -> str:
        from safetensors.torch import save_file
        self._write_config_file()
        path = self.cache_path(index)
        row = self.rows[index]
        dtype = CACHE_DTYPES[self.cache_dtype]
        meta = dict(pixel_hash=self.pixel_hash, sample_key=self.sample_key(index),
                    sample_id=row.sample_id, task=row.task, num_ref=row.num_ref, prompt=row.prompt)
        for name, tensor in encoded.items():
            if not bool(torch.isfinite(tensor).all()):
                raise VCUInputError(f'encoder produced NaN/Inf in {name!r}; not caching',
                                    row.describe(), name, path)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in encoded.items()}
        tmp = f'{path}.tmp{os.getpid()}'
        save_file(tensors, tmp, metadata=dict(vcu=json.dumps(meta)))
        os.replace(tmp, path)  # atomic: no half-written cache file
        return path

    def encode_indices(self, indices: Sequence[int]) -> List[Dict[str, torch.Tensor]]:
        """Encode samples (same ``shape_key``) in one batch with the codecs."""
        if self.codecs is None:
            row = self.rows[indices[0]]
            raise ValueError(f'sample {row.describe()}: no cache entry at '
                             f'{self.cache_path(indices[0])} and no codec configured; run '
                             '`python -m vdot_ext.tools.precompute_vcu` or set codec=...')
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
                    sample_id=row.sample_id, context=tensors['context'],
                    latents=tensors['latents'], vace_context=tensors['vace_context'])
        if 'negative_context' in tensors:
            item['negative_context'] = tensors['negative_context']
        return item

    def fetch(self, index: int) -> Dict[str, object]:
        """Sample ``index`` from the cache, else encoded (and cached); raises on bad input."""
        tensors = self.load_cached(index)
        if tensors is None:
            tensors = self.encode_indices([index])[0]
            if self.cache_subdir is not None and self.write_cache:
                self.save_cached(index, tensors)
        return self._item(index, tensors)

    def __getitem__(self, index: int) -> Dict[str, object]:
        index = int(index)
        if self.pixels_only:
            raise RuntimeError('VCUManifestDataset(pixels_only=True) has no encoded samples; use '
                               'get_vcu(index), or set cache_dir/codec')
        if not 0 <= index < len(self.rows):
            raise IndexError(f'VCUManifestDataset: index {index} out of range [0, {len(self.rows)})')
        if self.on_error == 'raise':
            return self.fetch(index)
        key = self.shape_key(index)
        if self._groups is None:  # replacement candidates: same shape, manifest order
            self._groups = {}
            for i in range(len(self.rows)):
                self._groups.setdefault(self.shape_key(i), []).append(i)
        group = self._groups[key]
        start = group.index(index)
        for step in range(len(group)):
            candidate = group[(start + step) % len(group)]
            sid = self.rows[candidate].sample_id
            if sid in self.bad_samples:
                continue
            try:
                return self.fetch(candidate)
            except VCUInputError as exc:
                self.bad_samples[sid] = str(exc)
                self.num_skipped += 1
                logger.warning(f'VCUManifestDataset: skipping bad sample ({self.num_skipped} '
                               f'skipped so far): {exc}')
        raise VCUInputError(f'every sample with {key} reference frame(s) is bad '
                            f'({len(group)} samples; see the logged errors)',
                            field='manifest', path=self.manifest)
