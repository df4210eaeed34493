"""Decoding x̂0 through the Wan VAE *with gradients*, bounded in memory (docs/DESIGN.md §13).

MoGAN §4.3 / Appendix A: the flow loss must reach the generator, so x̂0 is decoded with autograd.
The Wan2.1 decoder is chunk-recurrent: ``VideoVAE_.decode`` runs ``Decoder3d`` once per latent
frame ("chunk": latent frame 0 → 1 pixel frame, every later one → 4) and carries a cache of the
last two time steps of every causal convolution's input (``feat_cache``, ``CACHE_T = 2``) from
chunk to chunk. Unrolling all chunks with gradients stores every chunk's activations. MoGAN bounds
this by:

* **a random contiguous window** of L out of K latent chunks (paper: L = 12 of K = 21) — only
  those frames are decoded with gradients and reach the flow estimator;
* **truncated backprop through time** — the chunks before the window run under ``no_grad`` only
  to warm the recurrent cache, which enters the window detached (no gradient to earlier latents);
* **early stopping** — chunks after the window are not decoded at all;
* **gradient checkpointing** — inside the window each chunk keeps only its inputs (the latent
  frame and the cache it received) and is recomputed in backward.

The window's frames are exactly the frames full decoding gives (the cache is warmed by the same
chunks), so the only approximations are the truncated gradient and the sub-clip. Pixel frames of
a window of latent chunks [s, s + L): ``[0, 4(L−1)+1)`` if s = 0, else ``[4s − 3, 4(s+L−1) + 1)``
(4L frames). :func:`pixel_frame_range` gives them, to cut the matching real clip.

Works with diffsynth's ``WanVideoVAE`` and with ``TinyWanVAE`` (``vdot_ext.models.tiny_codecs``),
both of which wrap a ``VideoVAE_`` whose ``scale = [mean, 1/std]`` normalises the latents.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vdot_ext.registry import MODELS


def _wan_video_vae(vae):
    """The ``WanVideoVAE`` (has ``.model`` = ``VideoVAE_`` and ``.scale``) behind ``vae``."""
    from diffsynth.models.wan_video_vae import Decoder3d, VideoVAE_
    inner = getattr(vae, 'wan_vae', vae)  # TinyWanVAE wraps a WanVideoVAE
    model = getattr(inner, 'model', None)
    if not isinstance(model, VideoVAE_) or not hasattr(inner, 'scale'):
        raise TypeError(f'windowed decoding: expected diffsynth WanVideoVAE or TinyWanVAE, got '
                        f'{type(vae).__name__}')
    if type(model.decoder) is not Decoder3d:
        raise NotImplementedError(f'windowed decoding supports the Wan2.1 VAE (Decoder3d), got '
                                  f'{type(model.decoder).__name__}')
    return inner


def pixel_frame_range(start: int, stop: int) -> Tuple[int, int]:
    """Pixel frames ``[first, last)`` decoded from latent chunks ``[start, stop)`` (Wan2.1 VAE:
    chunk 0 → frame 0, chunk i ≥ 1 → frames 4i−3 … 4i)."""
    if not 0 <= start < stop:
        raise ValueError(f'pixel_frame_range: need 0 ≤ start < stop, got [{start}, {stop})')
    return (0 if start == 0 else 4 * start - 3, 4 * (stop - 1) + 1)


def _flatten_cache(cache: list):
    """Split a ``feat_cache`` list into tensors and a template (None / 'Rep' markers / slots)."""
    template, tensors = [], []
    for entry in cache:
        if isinstance(entry, torch.Tensor):
            template.append(len(tensors))
            tensors.append(entry)
        else:
            template.append(entry)  # None (not yet filled) or 'Rep' (upsample3d's first chunk)
    return template, tensors


def _rebuild_cache(template: list, tensors) -> list:
    return [tensors[e] if isinstance(e, int) else e for e in template]


def _decode_chunk(decoder, template: list, chunk: torch.Tensor, *cache_tensors):
    """One ``Decoder3d`` call on a fresh copy of the cache; returns (frames, new template, *tensors).

    Pure (no state outside its arguments), so checkpointing can rerun it in backward."""
    cache = _rebuild_cache(template, cache_tensors)
    out, cache, _ = decoder(chunk, feat_cache=cache, feat_idx=[0])
    new_template, new_tensors = _flatten_cache(cache)
    return (out, new_template, *new_tensors)


@dataclass
class DecodedWindow:
    """video [B, 3, frames, H, W] (unclamped); ``chunks`` = [start, stop) latent chunks;
    ``frames`` = [first, last) pixel frames of the full decode they equal."""
    video: torch.Tensor
    chunks: Tuple[int, int]
    frames: Tuple[int, int]


def decode_window(vae, latents: torch.Tensor, start: int, stop: int, *, gradient_checkpointing: bool = True,
                  clamp: bool = False) -> DecodedWindow:
    """Decode latent chunks [start, stop) of ``latents`` [B, 16, K, h, w] (normalised, like
    ``WanVideoVAE.decode`` takes them) with gradients inside the window only.

    Equals ``VideoVAE_.decode(latents)[:, :, first:last]`` in value (see the module docstring).
    ``clamp`` clamps to [-1, 1] like ``WanVideoVAE.decode``; off by default because clamping stops
    the gradient at saturated pixels.
    """
    inner = _wan_video_vae(vae)
    model = inner.model
    if latents.ndim != 5 or latents.shape[1] != model.z_dim:
        raise ValueError(f'decode_window: latents must be [B, {model.z_dim}, K, h, w], got '
                         f'{tuple(latents.shape)}')
    k = latents.shape[2]
    if not 0 <= start < stop <= k:
        raise ValueError(f'decode_window: window [{start}, {stop}) must satisfy 0 ≤ start < stop ≤ '
                         f'K = {k} latent chunks')
    dtype = next(model.parameters()).dtype
    z = latents[:, :, :stop].to(dtype)
    # un-normalise exactly as VideoVAE_.decode: z / (1/std) + mean
    mean, inv_std = (s.to(dtype=dtype, device=z.device).view(1, model.z_dim, 1, 1, 1) for s in inner.scale)
    z = z / inv_std + mean
    decoder = model.decoder
    from diffsynth.models.wan_video_vae import count_conv3d
    cache: List = [None] * count_conv3d(decoder)

    if start > 0:
        # warm the recurrent cache on the chunks before the window: no graph (truncated BPTT)
        with torch.no_grad():
            x_warm = model.conv2(z[:, :, :start])
            for i in range(start):
                _, cache, _ = decoder(x_warm[:, :, i:i + 1], feat_cache=cache, feat_idx=[0])
        cache = [e.detach() if isinstance(e, torch.Tensor) else e for e in cache]

    # conv2 is a 1×1×1 causal conv (no temporal context): apply it to the window only
    x = model.conv2(z[:, :, start:stop])
    use_checkpoint = gradient_checkpointing and torch.is_grad_enabled()
    outputs = []
    template, tensors = _flatten_cache(cache)
    for i in range(stop - start):
        args = (decoder, template, x[:, :, i:i + 1], *tensors)
        if use_checkpoint:
            result = checkpoint(_decode_chunk, *args, use_reentrant=False)
        else:
            result = _decode_chunk(*args)
        out, template, tensors = result[0], result[1], list(result[2:])
        outputs.append(out)
    video = torch.cat(outputs, dim=2)
    if clamp:
        video = video.clamp(-1.0, 1.0)
    return DecodedWindow(video=video, chunks=(start, stop), frames=pixel_frame_range(start, stop))


def sample_window(num_chunks: int, window_chunks: Optional[int],
                  generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """A uniformly random contiguous window [start, start + L) of L = ``window_chunks`` out of
    ``num_chunks`` latent chunks (the whole clip when ``window_chunks`` is None or ≥ K)."""
    if window_chunks is None or window_chunks >= num_chunks:
        return 0, num_chunks
    start = int(torch.randint(0, num_chunks - window_chunks + 1, (1,), generator=generator))
    return start, start + window_chunks


@MODELS.register_module()
class WindowedVAEDecoding(nn.Module):
    """Config entry for MoGAN's bounded decoding: ``decoding(vae, latents) → DecodedWindow``.

    Args:
        window_chunks: L, latent chunks decoded with gradients (MoGAN 1.3B: 12); None = all.
        gradient_checkpointing: recompute each chunk of the window in backward.
        clamp: clamp the decoded pixels to [-1, 1] (stops gradients at saturated pixels).
    """

    def __init__(self, window_chunks: Optional[int] = 12, gradient_checkpointing: bool = True,
                 clamp: bool = False):
        super().__init__()
        if window_chunks is not None and (not isinstance(window_chunks, int) or window_chunks <= 0):
            raise ValueError(f'WindowedVAEDecoding.window_chunks must be a positive int or None, got '
                             f'{window_chunks!r}')
        self.window_chunks = window_chunks
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.clamp = bool(clamp)

    def forward(self, vae, latents: torch.Tensor, generator: Optional[torch.Generator] = None,
                start: Optional[int] = None) -> DecodedWindow:
        """Decode a random window (or the one starting at ``start``)."""
        k = latents.shape[2]
        if start is None:
            start, stop = sample_window(k, self.window_chunks, generator)
        else:
            stop = k if self.window_chunks is None else min(k, start + self.window_chunks)
        return decode_window(vae, latents, start, stop, gradient_checkpointing=self.gradient_checkpointing,
                             clamp=self.clamp)

    def extra_repr(self) -> str:
        return (f'window_chunks={self.window_chunks}, gradient_checkpointing={self.gradient_checkpointing}, '
                f'clamp={self.clamp}')


def peak_cpu_memory_bytes(fn) -> Tuple[int, object]:
    """Run ``fn()`` under torch's profiler and return (peak bytes of CPU tensor memory allocated
    during the call above what was live before it, fn's result).

    The profiler records every allocation and free of torch's CPU allocator with its size; the
    running sum in time order is the live tensor memory, and its maximum the peak. (tracemalloc
    does not see torch's allocator.)
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == '[memory]' and event.device_type() == torch.autograd.DeviceType.CPU:
            events.append((event.start_ns(), event.nbytes()))
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result
