"""Tiny stand-ins for Wan2.1's frozen codecs (VAE and umT5 text encoder).

Both are the *real* diffsynth classes built small, so the demo and the tests run
the same code paths as the 14B setup:

* :class:`TinyWanVAE` — diffsynth's ``WanVideoVAE`` whose inner ``VideoVAE_`` is
  built with a small width (``WanVideoVAE`` hard-codes width 96, so the outer
  shell is built under ``skip_model_initialization()`` and ``.model`` is
  swapped). Encoding/decoding goes through ``WanVideoVAE.encode/decode``
  (per-video loop, causal chunked cache, per-channel latent normalisation
  ``z = (μ − mean) / std``). A random VAE makes samples meaningless, so
  :func:`train_tiny_vae` trains it briefly as an autoencoder, and
  :meth:`TinyWanVAE.calibrate_latent_scale` sets ``mean``/``std`` so that the
  latents a DiT sees have zero mean and unit variance per channel (the real Wan
  VAE ships such constants).
* :class:`WordTokenizer` + :class:`TinyTextEncoder` — a word-level tokenizer over
  a fixed vocabulary and diffsynth's ``WanTextEncoder`` (umT5 encoder) built
  small, with the pipeline's rule of zeroing embeddings past each prompt's
  length (diffsynth ``WanVideoUnit_PromptEmbedder.encode_prompt``).

Checkpoints are single ``.pth`` files holding plain tensors/lists/dicts, written
atomically (temporary file, then rename) and read with ``weights_only=True``
(docs/DESIGN.md §8). Both codecs can also be written to / read from a
``.safetensors`` file (tensors + the JSON config in the file's metadata): the
format of the demo's shipped assets (``vdot_ext/demo_assets``, made by
``python -m vdot_ext.tools.make_demo_assets``), which are checked against
SHA-256 digests before use (:func:`verify_demo_asset`).
"""
import hashlib
import json
import logging
import math
import os.path as osp
import re
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from vdot_ext.registry import MODELS
from vdot_ext.utils import assert_finite_state_dict, load_tensor_file, safe_torch_load, save_safetensors, save_torch


def _default_logger() -> logging.Logger:
    """mmengine's current logger (the Runner's / stage driver's log file)."""
    from mmengine.logging import MMLogger
    return MMLogger.get_current_instance()

LATENT_CHANNELS = 16  # WanVideoVAE's z_dim, fixed by the Wan2.1 DiT
SPATIAL_FACTOR = 8  # pixels per latent along H and W
TEMPORAL_FACTOR = 4  # frames per latent frame after the first


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (used to key encoded-data caches on codec weights)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


# the demo's shipped pretrained codecs and teacher (docs/DESIGN.md §8)
DEMO_ASSETS_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'demo_assets')
DEMO_ASSETS_COMMAND = 'python -m vdot_ext.tools.make_demo_assets --out vdot_ext/demo_assets'
DEMO_ASSET_FILES = dict(vae='tiny_wan_vae.safetensors', text_encoder='tiny_text_encoder.safetensors',
                        teacher='tiny_vace_teacher.safetensors')
DEMO_MANIFEST = 'manifest.json'


def demo_assets_dir(assets: str) -> str:
    """The folder of ``assets``: ``'shipped'`` (the package's ``vdot_ext/demo_assets``) or a path."""
    if not isinstance(assets, str) or not assets:
        raise ValueError(f"demo_assets: expected 'shipped' or a folder, got {assets!r}")
    folder = DEMO_ASSETS_DIR if assets == 'shipped' else osp.expanduser(assets)
    if not osp.isdir(folder):
        raise FileNotFoundError(f'demo_assets: folder {folder!r} does not exist; make it with '
                                f'`{DEMO_ASSETS_COMMAND}` (from the repository root)')
    return folder


def verify_demo_asset(assets: str, key: str, sha256: Optional[str] = None) -> str:
    """Path of the demo asset ``key`` (``vae``, ``text_encoder``, ``teacher``) after
    checking its SHA-256 against ``sha256`` (the config's pin) or, when None,
    against ``manifest.json`` in the same folder. A missing file, a missing
    manifest entry or a mismatch is an error naming the file and the command
    that regenerates it."""
    if key not in DEMO_ASSET_FILES:
        raise KeyError(f'demo asset {key!r}: expected one of {sorted(DEMO_ASSET_FILES)}')
    folder = demo_assets_dir(assets)
    path = osp.join(folder, DEMO_ASSET_FILES[key])
    redo = (f'regenerate the assets with `{DEMO_ASSETS_COMMAND}` (from the repository root) '
            'and update the pinned digests in configs/vdot_tiny.py (demo_asset_sha256)')
    if not osp.isfile(path):
        raise FileNotFoundError(f'demo asset {key}: file {path} does not exist; {redo}')
    if sha256 is None:
        manifest = osp.join(folder, DEMO_MANIFEST)
        if not osp.isfile(manifest):
            raise FileNotFoundError(f'demo asset {key}: no pinned SHA-256 and no {manifest}; {redo}')
        with open(manifest) as handle:
            sha256 = json.load(handle).get('files', {}).get(DEMO_ASSET_FILES[key], {}).get('sha256')
        if not sha256:
            raise ValueError(f'demo asset {key}: {manifest} has no sha256 for {DEMO_ASSET_FILES[key]}; {redo}')
    actual = file_sha256(path)
    if actual != sha256:
        raise ValueError(f'demo asset {key}: {path} has SHA-256 {actual}, expected {sha256} '
                         f'(a changed or corrupt file); {redo}')
    return path


def _read_safetensors(path: str, kind: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, metadata dict) of a codec ``.safetensors`` file written by ``save_safetensors``;
    NaN/Inf is a ``NonFiniteError`` naming the file."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as handle:
        meta = handle.metadata() or {}
    if meta.get('kind') != kind or 'config' not in meta:
        raise ValueError(f'{path}: not a {kind} safetensors file (metadata kind={meta.get("kind")!r}, '
                         f'expected {kind!r} with a config)')
    tensors = load_tensor_file(path, field=f'{kind} safetensors')
    assert_finite_state_dict(tensors, path)
    return tensors, {k: json.loads(v) for k, v in meta.items() if k != 'kind'}


def _check_video_shape(videos: torch.Tensor, name: str = 'videos') -> None:
    """Wan VAE geometry: [B, 3, 4k+1, H, W] with H, W multiples of 16.

    Multiples of 16 (not 8) so the latent H/8, W/8 are even for the DiT's 2×2
    patch embedding.
    """
    if not isinstance(videos, torch.Tensor):
        raise TypeError(f'{name}: expected a torch.Tensor, got {type(videos).__name__}')
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f'{name}: expected shape [B, 3, T, H, W], got {tuple(videos.shape)}')
    _, _, t, h, w = videos.shape
    if (t - 1) % TEMPORAL_FACTOR != 0:
        raise ValueError(f'{name}: number of frames T={t} must be 4k+1 (1, 5, 9, 13, 17, ...)')
    if h % 16 != 0 or w % 16 != 0:
        raise ValueError(f'{name}: height and width must be multiples of 16, got H={h}, W={w}')


def _check_latent_shape(latents: torch.Tensor, name: str = 'latents') -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f'{name}: expected a torch.Tensor, got {type(latents).__name__}')
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(f'{name}: expected shape [B, {LATENT_CHANNELS}, F_lat, h, w], '
                         f'got {tuple(latents.shape)}')


def _build_wan_video_vae_shell():
    """WanVideoVAE with its width-96 inner model left on the meta device (no memory)."""
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.wan_video_vae import WanVideoVAE
    with skip_model_initialization():
        shell = WanVideoVAE(z_dim=LATENT_CHANNELS)
    return shell


@MODELS.register_module()
class TinyWanVAE(nn.Module):
    """diffsynth ``WanVideoVAE`` with a small ``VideoVAE_`` inside.

    Args:
        dim: base width of ``VideoVAE_`` (Wan2.1 uses 96).
        dim_mult: width multipliers per level; 4 levels → 8× spatial downsampling.
        num_res_blocks: residual blocks per level (Wan2.1 uses 2).
        seed: seed of the initial weights (construction is deterministic).

    ``encode``: videos ``[B, 3, T, H, W]`` in [-1, 1] → latents
    ``[B, 16, (T−1)/4+1, H/8, W/8]``; ``decode`` is the inverse map, output
    clamped to [-1, 1] by diffsynth.
    """

    def __init__(self,
                 dim: int = 8,
                 dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 1,
                 seed: int = 0):
        super().__init__()
        from diffsynth.models.wan_video_vae import VideoVAE_
        if len(dim_mult) != 4:
            raise ValueError(f'TinyWanVAE.dim_mult: expected 4 levels (8× spatial, 4× temporal '
                             f'downsampling of WanVideoVAE), got {list(dim_mult)}')
        self.config = dict(dim=int(dim), dim_mult=[int(m) for m in dim_mult],
                           num_res_blocks=int(num_res_blocks), seed=int(seed))
        wan_vae = _build_wan_video_vae_shell()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wan_vae.model = VideoVAE_(dim=dim, z_dim=LATENT_CHANNELS, dim_mult=list(dim_mult),
                                      num_res_blocks=num_res_blocks, attn_scales=[],
                                      temperal_downsample=[False, True, True], dropout=0.0)
        # Wan2.1's latent statistics do not describe this VAE: start from the
        # identity normalisation; `calibrate_latent_scale` sets the real ones.
        self.wan_vae = wan_vae
        self.set_latent_scale(torch.zeros(LATENT_CHANNELS), torch.ones(LATENT_CHANNELS))
        self.freeze()

    # -- normalisation ------------------------------------------------------
    def set_latent_scale(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set WanVideoVAE's per-channel ``mean``/``std`` (z = (μ − mean)/std)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != LATENT_CHANNELS or std.numel() != LATENT_CHANNELS:
            raise ValueError(f'latent mean/std: expected {LATENT_CHANNELS} values each, '
                             f'got {mean.numel()} and {std.numel()}')
        if not bool((std > 0).all()):
            raise ValueError('latent std: all values must be > 0')
        self.wan_vae.mean = mean.clone()
        self.wan_vae.std = std.clone()
        self.wan_vae.scale = [self.wan_vae.mean, 1.0 / self.wan_vae.std]

    @property
    def latent_mean(self) -> torch.Tensor:
        return self.wan_vae.mean

    @property
    def latent_std(self) -> torch.Tensor:
        return self.wan_vae.std

    @torch.no_grad()
    def calibrate_latent_scale(self, videos: torch.Tensor, batch_size: int = 8,
                               min_std_ratio: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean/std of the raw encoder output μ over ``videos``.

        Like Wan2.1's constants, they make the normalised latents ~zero-mean,
        unit-variance per channel (what flow matching with ε ~ N(0, I) assumes).
        A channel's std is floored at ``min_std_ratio`` × median std so a nearly
        constant channel is not blown up into noise.
        """
        _check_video_shape(videos)
        self.set_latent_scale(torch.zeros(LATENT_CHANNELS), torch.ones(LATENT_CHANNELS))
        # batched VideoVAE_.encode: same math as WanVideoVAE.encode's per-video loop, faster
        raw = torch.cat([self.encode_with_grad(videos[i:i + batch_size].float())
                         for i in range(0, videos.shape[0], batch_size)])
        per_channel = raw.transpose(0, 1).reshape(LATENT_CHANNELS, -1).double()
        mean = per_channel.mean(dim=1)
        std = per_channel.std(dim=1)
        std = torch.maximum(std, min_std_ratio * std.median())
        self.set_latent_scale(mean.float(), std.float())
        return self.latent_mean, self.latent_std

    # -- state --------------------------------------------------------------
    def freeze(self) -> 'TinyWanVAE':
        """Frozen and eval, like WanVideoVAE's own ``eval().requires_grad_(False)``."""
        self.wan_vae.model.eval().requires_grad_(False)
        self.eval()
        return self

    @property
    def model(self) -> nn.Module:
        """The inner ``VideoVAE_`` (encoder/decoder weights)."""
        return self.wan_vae.model

    # -- inference path (WanVideoVAE.encode / decode) ------------------------
    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, 3, 4k+1, H, W] in [-1, 1] → [B, 16, k+1, H/8, W/8] (normalised latents)."""
        _check_video_shape(videos)
        return self.wan_vae.encode(videos.float(), device='cpu')

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, F, h, w] → [B, 3, 4(F−1)+1, 8h, 8w] in [-1, 1]."""
        _check_latent_shape(latents)
        return self.wan_vae.decode(latents.float(), device='cpu')

    # -- training path: the same VideoVAE_ encode/decode math, batched -------
    def encode_with_grad(self, videos: torch.Tensor) -> torch.Tensor:
        """Batched ``VideoVAE_.encode`` with autograd (what ``WanVideoVAE.encode``
        runs per video); used by :func:`train_tiny_vae`."""
        _check_video_shape(videos)
        return self.wan_vae.model.encode(videos, self.wan_vae.scale)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """Batched ``VideoVAE_.decode`` with autograd, unclamped (clamping would
        stop gradients at saturated pixels)."""
        _check_latent_shape(latents)
        return self.wan_vae.model.decode(latents, self.wan_vae.scale)

    # -- fast-training initialisation ----------------------------------------
    @torch.no_grad()
    def init_for_training(self, videos: torch.Tensor, target_std: float = 1.0) -> 'TinyWanVAE':
        """Re-initialise so that a short autoencoder training works.

        With PyTorch's default init a width-8 VideoVAE_ barely lets the input
        through: conv biases dominate, and the RMS norms (per-pixel channel
        normalisation) then squash what is left, so the output hardly depends on
        the input and training crawls. Here:

        * conv biases → 0; the last conv of every residual branch → 0, so each
          residual block starts as its shortcut (zero-init residuals, Goyal et
          al. 2017 "Accurate, large minibatch SGD");
        * temporal resampling convs get Wan's own identity inits
          (``Resample.init_weight`` / ``init_weight2``);
        * every other conv is rescaled, in forward order, so its output on
          ``videos`` has std ``target_std`` (LSUV, Mishkin & Matas 2016).
        """
        from diffsynth.models.wan_video_vae import Resample, ResidualBlock
        _check_video_shape(videos)
        model = self.model
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        for conv in convs:
            if conv.bias is not None:
                conv.bias.zero_()
        zeroed = set()
        for module in model.modules():
            if isinstance(module, ResidualBlock):
                last = module.residual[-1]
                last.weight.zero_()
                zeroed.add(last)
            if isinstance(module, Resample) and hasattr(module, 'time_conv'):
                if module.mode == 'downsample3d':
                    module.init_weight(module.time_conv)
                else:
                    module.init_weight2(module.time_conv)
                zeroed.add(module.time_conv)
        done = set()

        def rescale(module, _inp, out):
            # biases are 0, so scaling the weight scales the output exactly; the
            # scaled output is passed on, so later layers see the corrected input
            # and one forward pass initialises all layers in order
            if module in done:
                return None
            done.add(module)
            factor = target_std / max(float(out.std()), 1e-8)
            module.weight.mul_(factor)
            return out * factor

        hooks = [c.register_forward_hook(rescale) for c in convs if c not in zeroed]
        try:
            self.decode_with_grad(self.encode_with_grad(videos))
        finally:
            for h in hooks:
                h.remove()
        # the decoder's last conv: output spread of the data, not 1
        model.decoder.head[-1].weight.mul_(float(videos.std()) / target_std)
        return self

    # -- checkpoint ---------------------------------------------------------
    def save(self, path: str, extra: Optional[dict] = None) -> str:
        """One ``.pth``: config, VideoVAE_ state dict, latent mean/std, extras."""
        payload = dict(kind='TinyWanVAE', config=dict(self.config),
                       state_dict={k: v.detach().clone() for k, v in self.model.state_dict().items()},
                       latent_mean=self.latent_mean.clone(), latent_std=self.latent_std.clone(),
                       extra=dict(extra or {}))
        save_torch(payload, path)
        return path

    @classmethod
    def load(cls, path: str) -> 'TinyWanVAE':
        """Safe load (``weights_only=True``); NaN/Inf weights or latent
        statistics are a ``NonFiniteError`` naming the file."""
        payload = safe_torch_load(path, field='TinyWanVAE checkpoint')
        if not isinstance(payload, dict) or payload.get('kind') != 'TinyWanVAE':
            raise ValueError(f'{path}: not a TinyWanVAE checkpoint (missing kind="TinyWanVAE")')
        assert_finite_state_dict(dict(payload['state_dict'], latent_mean=payload['latent_mean'],
                                      latent_std=payload['latent_std']), path)
        vae = cls(**payload['config'])
        vae.model.load_state_dict(payload['state_dict'], strict=True)
        vae.set_latent_scale(payload['latent_mean'], payload['latent_std'])
        return vae.freeze()

    def save_safetensors(self, path: str, extra: Optional[dict] = None) -> str:
        """The ``VideoVAE_`` weights + ``latent_mean``/``latent_std`` as safetensors; config
        and ``extra`` as JSON metadata (no pickle)."""
        tensors = dict(self.model.state_dict(), latent_mean=self.latent_mean, latent_std=self.latent_std)
        save_safetensors(tensors, path, metadata=dict(kind='TinyWanVAE', config=json.dumps(self.config),
                                                      extra=json.dumps(extra or {})))
        return path

    @classmethod
    def load_safetensors(cls, path: str) -> 'TinyWanVAE':
        """Inverse of :meth:`save_safetensors` (strict keys, finite values)."""
        tensors, meta = _read_safetensors(path, 'TinyWanVAE')
        mean, std = tensors.pop('latent_mean', None), tensors.pop('latent_std', None)
        if mean is None or std is None:
            raise ValueError(f'{path}: TinyWanVAE safetensors file lacks latent_mean/latent_std')
        vae = cls(**meta['config'])
        vae.model.load_state_dict(tensors, strict=True)
        vae.set_latent_scale(mean, std)
        return vae.freeze()


def _as_video_pool(videos) -> torch.Tensor:
    """Tensor [N, 3, T, H, W] from a tensor, a sequence of [3, T, H, W] tensors,
    or a dataset/iterable whose items are such tensors or dicts with 'video'."""
    if isinstance(videos, torch.Tensor):
        pool = videos
    else:
        items = []
        for item in videos:
            if isinstance(item, dict):
                if 'video' not in item:
                    raise KeyError("train_tiny_vae: dict items need a 'video' key "
                                   f"(got keys {sorted(item)})")
                item = item['video']
            items.append(torch.as_tensor(item))
        if not items:
            raise ValueError('train_tiny_vae: no training videos given')
        pool = torch.stack(items)
    if pool.ndim == 4:
        pool = pool.unsqueeze(0)
    _check_video_shape(pool, 'train_tiny_vae videos')
    return pool.float()


@torch.no_grad()
def recon_psnr(vae: TinyWanVAE, videos: torch.Tensor, batch_size: int = 8) -> float:
    """PSNR (dB, data range 2 for [-1, 1]) of decode(encode(videos)), clamped to
    [-1, 1] like ``WanVideoVAE.decode``, pooled over all pixels. Runs the batched
    ``VideoVAE_`` calls (the same math as ``encode``/``decode``'s per-video loop,
    several times faster on CPU; equality is tested)."""
    mse_sum, count = 0.0, 0
    for i in range(0, videos.shape[0], batch_size):
        batch = videos[i:i + batch_size].float()
        recon = vae.decode_with_grad(vae.encode_with_grad(batch)).clamp(-1, 1)
        mse_sum += float(((recon - batch)**2).double().sum())
        count += batch.numel()
    mse = mse_sum / count
    return float('inf') if mse == 0 else 10.0 * math.log10(4.0 / mse)


def train_tiny_vae(vae: TinyWanVAE,
                   videos,
                   steps: int = 400,
                   lr: float = 5e-4,
                   log_every: int = 50,
                   logger: Optional[logging.Logger] = None,
                   batch_size: int = 2,
                   clip_frames: Optional[int] = None,
                   crop_size: Optional[int] = None,
                   latent_l2: float = 1e-4,
                   eval_videos: Optional[torch.Tensor] = None,
                   seed: int = 0,
                   calibrate: bool = True,
                   decoder_only: bool = False,
                   device: Optional[Union[str, torch.device]] = None) -> Dict[str, float]:
    """Train the tiny VAE as an autoencoder; returns metrics.

    Loss: ``mean((D(E(x)) − x)²) + latent_l2·mean(μ²)`` on random
    ``clip_frames``-frame windows (default: whole videos; the VAE is causal
    and processes time in chunks of 4 frames after the first, and windows of
    5 frames never train the chunk cache's steady state — frames ≥ 5 of a
    17-frame video then reconstruct ~8 dB worse) and random ``crop_size``
    crops (aligned to 8 px). Call :meth:`TinyWanVAE.init_for_training` on a
    fresh VAE first (much faster start). ``WanVideoVAE`` keeps its
    model frozen/eval: gradients are switched on here explicitly and the model is
    frozen again at the end, whatever happens. ``VideoVAE_.encode`` only uses μ
    (no sampling), so there is no KL term; the small μ² penalty keeps latents
    bounded before :meth:`TinyWanVAE.calibrate_latent_scale` normalises them.

    ``decoder_only``: train ``conv2`` + ``decoder`` alone on the latents of the
    frozen encoder (no latent penalty, no recalibration): the latents, their
    normalisation and so any model trained on them stay exactly as they were,
    while decoded videos get better (the demo assets fine-tune the codec's
    decoder after the teacher has been trained on its latents).

    ``device``: where the training steps run (default: the CPU, like
    ``WanVideoVAE``'s own ``encode``/``decode``); the model is back on the CPU
    afterwards, where the PSNRs and the latent calibration are computed. The
    draws of crops, clips and flips come from a CPU generator, so they are the
    same on any device.

    Returns ``dict(final_recon_psnr, initial_recon_psnr, first_loss, last_loss,
    train_seconds, steps, device)``; PSNRs are measured through ``encode``/``decode`` on
    the full-length ``eval_videos`` (default: up to 8 training videos).
    """
    logger = logger or _default_logger()
    pool = _as_video_pool(videos)
    clip_frames = pool.shape[2] if clip_frames is None else clip_frames
    if clip_frames < 1 or (clip_frames - 1) % TEMPORAL_FACTOR != 0 or clip_frames > pool.shape[2]:
        raise ValueError(f'train_tiny_vae.clip_frames={clip_frames}: must be 4k+1 and ≤ the '
                         f'video length {pool.shape[2]}')
    if crop_size is not None and (crop_size % 16 or crop_size > min(pool.shape[3:])):
        raise ValueError(f'train_tiny_vae.crop_size={crop_size}: must be a multiple of 16 and ≤ '
                         f'the video size {tuple(pool.shape[3:])}')
    eval_set = pool[:8] if eval_videos is None else _as_video_pool(eval_videos)
    initial_psnr = recon_psnr(vae, eval_set)
    generator = torch.Generator().manual_seed(seed)
    model = vae.model
    if decoder_only:
        params = list(model.conv2.parameters()) + list(model.decoder.parameters())
        calibrate = False
    else:
        params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    # linear warm-up (Adam's first steps are large) then cosine decay to 10%
    warmup = max(1, steps // 10)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(s - warmup, steps - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: List[float] = []
    device = torch.device('cpu' if device is None else device)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        train_pool = pool
        if device.type != 'cpu':
            model.to(device)
            train_pool = pool.to(device)
            # WanVideoVAE keeps its latent mean/std as plain tensors, not buffers
            vae.wan_vae.scale = [vae.latent_mean.to(device), (1.0 / vae.latent_std).to(device)]
        model.train().requires_grad_(not decoder_only)
        for p in params:
            p.requires_grad_(True)
        if decoder_only:
            model.encoder.eval()
            model.conv1.eval()
        for step in range(steps):
            idx = torch.randint(0, pool.shape[0], (batch_size, ), generator=generator).to(device)
            t0 = int(torch.randint(0, pool.shape[2] - clip_frames + 1, (1, ), generator=generator))
            clip = train_pool[idx, :, t0:t0 + clip_frames]
            if crop_size is not None:
                y0 = int(torch.randint(0, pool.shape[3] - crop_size + 1, (1, ), generator=generator)) // 8 * 8
                x0 = int(torch.randint(0, pool.shape[4] - crop_size + 1, (1, ), generator=generator)) // 8 * 8
                clip = clip[..., y0:y0 + crop_size, x0:x0 + crop_size]
            # random horizontal flips: cheap augmentation for a tiny data pool
            flip = (torch.rand(batch_size, generator=generator) < 0.5).to(device)
            clip = torch.where(flip.view(-1, 1, 1, 1, 1), clip.flip(-1), clip)
            with torch.enable_grad():
                if decoder_only:
                    with torch.no_grad():
                        mu = vae.encode_with_grad(clip)
                    loss = ((vae.decode_with_grad(mu) - clip)**2).mean()
                else:
                    mu = vae.encode_with_grad(clip)
                    recon = vae.decode_with_grad(mu)
                    loss = ((recon - clip)**2).mean() + latent_l2 * (mu**2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                logger.info(f'tiny VAE step {step + 1}/{steps}: loss {losses[-1]:.5f} '
                            f'({time.perf_counter() - start:.1f}s wall, '
                            f'{time.process_time() - cpu_start:.1f}s cpu)')
    finally:
        vae.freeze()
        model.clear_cache()  # drop the autograd graph held by the causal cache
        if device.type != 'cpu':
            model.to('cpu')
            vae.set_latent_scale(vae.latent_mean.cpu(), vae.latent_std.cpu())
    train_seconds = time.perf_counter() - start
    if calibrate:
        vae.calibrate_latent_scale(pool)
    final_psnr = recon_psnr(vae, eval_set)
    logger.info(f'tiny VAE trained {steps} steps in {train_seconds:.1f}s: recon PSNR '
                f'{initial_psnr:.2f} → {final_psnr:.2f} dB')
    return dict(final_recon_psnr=final_psnr, initial_recon_psnr=initial_psnr,
                first_loss=losses[0] if losses else float('nan'),
                last_loss=losses[-1] if losses else float('nan'),
                train_seconds=train_seconds, steps=steps, device=str(device))


# ---------------------------------------------------------------------------
# text side
# ---------------------------------------------------------------------------
class WordTokenizer:
    """Deterministic word-level tokenizer over a fixed vocabulary.

    ids: 0 = ``<pad>``, 1 = ``<eos>``, 2 = ``<unk>``, then the vocabulary words
    (lower-cased, de-duplicated, in the given order). A prompt is lower-cased,
    split into ``[a-z0-9]+`` words, mapped, terminated by ``<eos>`` (as umT5 does)
    and padded/truncated to ``max_length``; the mask is 1 on real tokens.

    Callable like diffsynth's ``HuggingfaceTokenizer``:
    ``tokenizer(prompts, return_mask=True, add_special_tokens=True)``.
    """
    PAD, EOS, UNK = '<pad>', '<eos>', '<unk>'
    _WORD = re.compile(r'[a-z0-9]+')

    def __init__(self, vocabulary: Iterable[str], max_length: int = 16):
        if max_length < 2:
            raise ValueError(f'WordTokenizer.max_length must be ≥ 2, got {max_length}')
        words: List[str] = []
        for word in vocabulary:
            word = str(word).lower()
            if not self._WORD.fullmatch(word):
                raise ValueError(f'WordTokenizer vocabulary: {word!r} is not a single '
                                 'lower-case alphanumeric word')
            if word not in words:
                words.append(word)
        self.words = words
        self.max_length = int(max_length)
        self.itos = [self.PAD, self.EOS, self.UNK] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def tokenize(self, prompt: str) -> List[int]:
        if not isinstance(prompt, str):
            raise TypeError(f'WordTokenizer: prompts must be str, got {type(prompt).__name__}')
        ids = [self.stoi.get(w, 2) for w in self._WORD.findall(prompt.lower())]
        return ids[:self.max_length - 1] + [1]

    def __call__(self, prompts: Union[str, Sequence[str]], return_mask: bool = False,
                 add_special_tokens: bool = True, **unused):
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.tokenize(prompt)
            if not add_special_tokens:
                tokens = tokens[:-1]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return (ids, mask) if return_mask else ids

    def decode(self, ids: Sequence[int]) -> str:
        return ' '.join(self.itos[int(i)] for i in ids if int(i) > 2)


@MODELS.register_module()
class TinyTextEncoder(nn.Module):
    """diffsynth ``WanTextEncoder`` (umT5 encoder) built small, frozen, eval.

    ``encode(prompts) → [B, max_length, dim]`` with rows past each prompt's
    token count (incl. ``<eos>``) zeroed, as diffsynth's
    ``WanVideoUnit_PromptEmbedder.encode_prompt`` does. (diffsynth zeroes
    ``prompt_emb[:, v:]`` for every batch row with each row's length — the same at
    batch 1, which is how the pipeline calls it; here each row uses its own
    length so batches equal per-prompt calls.)
    """

    def __init__(self,
                 vocabulary: Sequence[str],
                 max_length: int = 16,
                 dim: int = 32,
                 dim_attn: int = 32,
                 dim_ffn: int = 64,
                 num_heads: int = 2,
                 num_layers: int = 2,
                 num_buckets: int = 32,
                 seed: int = 0):
        super().__init__()
        from diffsynth.models.wan_video_text_encoder import WanTextEncoder
        self.tokenizer = WordTokenizer(vocabulary, max_length=max_length)
        self.config = dict(vocabulary=list(self.tokenizer.words), max_length=int(max_length),
                           dim=int(dim), dim_attn=int(dim_attn), dim_ffn=int(dim_ffn),
                           num_heads=int(num_heads), num_layers=int(num_layers),
                           num_buckets=int(num_buckets), seed=int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = WanTextEncoder(vocab=self.tokenizer.vocab_size, dim=dim,
                                          dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                                          num_layers=num_layers, num_buckets=num_buckets,
                                          shared_pos=False, dropout=0.0)
        self.encoder.eval().requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return self.config['dim']

    def train(self, mode: bool = True):
        # frozen codec: always eval (dropout is 0 anyway; keeps state explicit)
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        ids, mask = self.tokenizer(prompts, return_mask=True, add_special_tokens=True)
        seq_lens = mask.gt(0).sum(dim=1).long()
        emb = self.encoder(ids, mask)
        for row, length in enumerate(seq_lens):
            emb[row, length:] = 0
        return emb

    def save(self, path: str) -> str:
        payload = dict(kind='TinyTextEncoder', config=dict(self.config),
                       state_dict={k: v.detach().clone() for k, v in self.encoder.state_dict().items()})
        save_torch(payload, path)
        return path

    @classmethod
    def load(cls, path: str) -> 'TinyTextEncoder':
        """Safe load (``weights_only=True``); NaN/Inf weights are a
        ``NonFiniteError`` naming the file."""
        payload = safe_torch_load(path, field='TinyTextEncoder checkpoint')
        if not isinstance(payload, dict) or payload.get('kind') != 'TinyTextEncoder':
            raise ValueError(f'{path}: not a TinyTextEncoder checkpoint (missing kind="TinyTextEncoder")')
        assert_finite_state_dict(payload['state_dict'], path)
        encoder = cls(**payload['config'])
        encoder.encoder.load_state_dict(payload['state_dict'], strict=True)
        return encoder

    def save_safetensors(self, path: str) -> str:
        """The encoder weights as safetensors, the config (vocabulary included) as JSON metadata."""
        save_safetensors(dict(self.encoder.state_dict()), path,
                         metadata=dict(kind='TinyTextEncoder', config=json.dumps(self.config)))
        return path

    @classmethod
    def load_safetensors(cls, path: str) -> 'TinyTextEncoder':
        """Inverse of :meth:`save_safetensors` (strict keys, finite values)."""
        tensors, meta = _read_safetensors(path, 'TinyTextEncoder')
        encoder = cls(**meta['config'])
        encoder.encoder.load_state_dict(tensors, strict=True)
        return encoder
