"""VCU (Video Condition Unit) encoder: ``V = [T; F; M]`` → VACE ``vace_context``.

Batched re-statement of diffsynth's ``WanVideoUnit_VACE.process``
(diffsynth/pipelines/wan_video.py, after VACE, Jiang et al. 2025) working on
tensors instead of PIL frames (docs/DESIGN.md §4)::

    M̂         = 1[M > 0.5]                              binarised mask, 1 = generate
    inactive  = F · (1 − M̂)      → VAE → 16 ch          kept pixels
    reactive  = F · M̂            → VAE → 16 ch          pixels to re-generate
    mask      = pixel-unshuffle_8×8(M̂) → 64 ch, resized in time to F_lat (nearest-exact)
    refs      = VAE(r_j) each as a 1-frame video, zero-padded 16 → 32 ch,
                prepended in time; their mask frames are zeros
    context   = concat_ch(inactive, reactive, mask)  → 96 ch, n_ref + F_lat frames

Pixels in [-1, 1]; grey 0 (≙ 127.5) marks missing pixels.
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

SPATIAL_FACTOR = 8


def _wan_video_vae(vae):
    """The diffsynth ``WanVideoVAE`` behind ``vae`` (TinyWanVAE or WanVideoVAE)."""
    from diffsynth.models.wan_video_vae import WanVideoVAE
    inner = getattr(vae, 'wan_vae', vae)
    if not isinstance(inner, WanVideoVAE):
        raise TypeError('encode_vcu: vae must be a diffsynth WanVideoVAE or have one as '
                        f'.wan_vae (e.g. TinyWanVAE), got {type(vae).__name__}')
    return inner


def _vae_device(wan_vae) -> torch.device:
    param = next(wan_vae.model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')


def _stack_refs(ref_images, batch: int, height: int, width: int) -> torch.Tensor:
    """list of [B, 3, 1, H, W] or a [B, 3, n_ref, H, W] tensor → [B, 3, n_ref, H, W]."""
    if isinstance(ref_images, (list, tuple)):
        if len(ref_images) == 0:
            raise ValueError('encode_vcu.ref_images: empty list (pass None for no references)')
        for j, ref in enumerate(ref_images):
            if not isinstance(ref, torch.Tensor) or ref.ndim != 5 or ref.shape[1] != 3 or ref.shape[2] != 1:
                shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
                raise ValueError(f'encode_vcu.ref_images[{j}]: expected [B, 3, 1, H, W], got {shape}')
        ref_images = torch.cat(list(ref_images), dim=2)
    if not isinstance(ref_images, torch.Tensor) or ref_images.ndim != 5 or ref_images.shape[1] != 3:
        shape = tuple(ref_images.shape) if isinstance(ref_images, torch.Tensor) else type(ref_images).__name__
        raise ValueError(f'encode_vcu.ref_images: expected [B, 3, n_ref, H, W] or a list of '
                         f'[B, 3, 1, H, W], got {shape}')
    b, _, _, h, w = ref_images.shape
    if b != batch:
        raise ValueError(f'encode_vcu.ref_images: batch size {b} != frames batch size {batch}')
    if (h, w) != (height, width):
        raise ValueError(f'encode_vcu.ref_images: size {h}×{w} != frames size {height}×{width} '
                         '(VACE references must be resized/padded to the video size)')
    return ref_images


def _check_inputs(frames: torch.Tensor, masks: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f'encode_vcu.frames: expected [B, 3, T, H, W] in [-1, 1], got {shape}')
    if not isinstance(masks, torch.Tensor) or masks.ndim != 5 or masks.shape[1] != 1:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f'encode_vcu.masks: expected [B, 1, T, H, W] in [0, 1], got {shape}')
    b, _, t, h, w = frames.shape
    if masks.shape[0] != b:
        raise ValueError(f'encode_vcu.masks: batch size {masks.shape[0]} != frames batch size {b}')
    if masks.shape[2] != t:
        raise ValueError(f'encode_vcu.masks: {masks.shape[2]} frames != frames length {t}')
    if tuple(masks.shape[3:]) != (h, w):
        raise ValueError(f'encode_vcu.masks: size {tuple(masks.shape[3:])} != frames size {(h, w)}')
    if (t - 1) % 4 != 0:
        raise ValueError(f'encode_vcu.frames: T={t} frames, the Wan VAE needs 4k+1')
    if h % 16 or w % 16:
        raise ValueError(f'encode_vcu.frames: H={h}, W={w} must be multiples of 16 '
                         '(8× VAE downsampling and the DiT 2×2 patches)')


@torch.no_grad()
def encode_videos(wan_vae, videos: torch.Tensor, batched: bool = True) -> torch.Tensor:
    """Normalised VAE latents of ``[B, 3, T, H, W]`` videos.

    ``batched=False`` is ``WanVideoVAE.encode`` (a loop over videos);
    ``batched=True`` runs the same ``VideoVAE_.encode`` once on the whole batch
    (identical math; ~5× faster on CPU at these sizes). All-zero (all-grey)
    videos — T2V/R2V frames, the inactive half of full-mask tasks — are encoded
    once and broadcast.
    """
    device = _vae_device(wan_vae)
    videos = videos.float()
    is_zero = videos.flatten(1).abs().amax(dim=1) == 0
    rows = torch.nonzero(~is_zero).flatten().tolist()
    if not batched:
        return wan_vae.encode(videos, device=device).float().to(videos.device)

    def run(x):
        return wan_vae.model.encode(x.to(device), wan_vae.scale).float().to(videos.device)

    out = None
    if rows:
        encoded = run(videos[rows])
        out = encoded.new_empty((videos.shape[0], ) + encoded.shape[1:])
        out[rows] = encoded
    if bool(is_zero.any()):
        zero = run(torch.zeros_like(videos[:1]))
        if out is None:
            out = zero.new_empty((videos.shape[0], ) + zero.shape[1:])
        out[is_zero] = zero
    return out


@torch.no_grad()
def encode_vcu(vae,
               frames: torch.Tensor,
               masks: torch.Tensor,
               ref_images: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
               batched: bool = True) -> torch.Tensor:
    """Encode a batch of VCUs into VACE's ``vace_context``.

    Args:
        vae: ``TinyWanVAE`` or diffsynth ``WanVideoVAE``.
        frames: ``[B, 3, T, H, W]`` in [-1, 1], grey 0 where pixels are missing.
        masks: ``[B, 1, T, H, W]`` in [0, 1], 1 = generate (binarised at 0.5).
        ref_images: None, a ``[B, 3, n_ref, H, W]`` tensor, or a list of
            ``n_ref`` tensors ``[B, 3, 1, H, W]``.
        batched: encode the batch in one ``VideoVAE_.encode`` call (default)
            instead of ``WanVideoVAE.encode``'s per-video loop; same result.

    Returns:
        ``[B, 96, n_ref + (T−1)/4 + 1, H/8, W/8]`` float32.
    """
    _check_inputs(frames, masks)
    wan_vae = _wan_video_vae(vae)
    b, _, t, h, w = frames.shape
    frames = frames.float()
    mask = (masks.float() > 0.5).float()

    inactive = frames * (1 - mask)
    reactive = frames * mask
    # WanVideoVAE.encode loops over videos anyway: one call for both halves.
    latents = encode_videos(wan_vae, torch.cat([inactive, reactive]), batched)
    video_latents = torch.cat([latents[:b], latents[b:]], dim=1)  # [B, 32, F_lat, h, w]

    # 8×8 pixel-unshuffle: channel index = p·8 + q for pixel (8i+p, 8j+q),
    # as einops "T (H P) (W Q) -> (P Q) T H W" in diffsynth.
    m = mask[:, 0]  # [B, T, H, W]
    m = m.reshape(b, t, h // SPATIAL_FACTOR, SPATIAL_FACTOR, w // SPATIAL_FACTOR, SPATIAL_FACTOR)
    m = m.permute(0, 3, 5, 1, 2, 4).reshape(b, SPATIAL_FACTOR**2, t, h // SPATIAL_FACTOR,
                                          w // SPATIAL_FACTOR)
    f_lat = (t + 3) // 4
    mask_latents = F.interpolate(m, size=(f_lat, h // SPATIAL_FACTOR, w // SPATIAL_FACTOR),
                                 mode='nearest-exact')

    if ref_images is not None:
        refs = _stack_refs(ref_images, b, h, w).float()
        n_ref = refs.shape[2]
        # each reference is its own 1-frame video (diffsynth encodes them separately)
        ref_videos = refs.permute(0, 2, 1, 3, 4).reshape(b * n_ref, 3, 1, h, w)
        ref_latents = encode_videos(wan_vae, ref_videos, batched)  # [B·n, 16, 1, h, w]
        ref_latents = ref_latents.reshape(b, n_ref, *ref_latents.shape[1:])[:, :, :, 0]
        ref_latents = ref_latents.permute(0, 2, 1, 3, 4)  # [B, 16, n_ref, h, w]
        ref_latents = torch.cat([ref_latents, torch.zeros_like(ref_latents)], dim=1)
        video_latents = torch.cat([ref_latents, video_latents], dim=2)
        mask_latents = torch.cat([mask_latents.new_zeros(b, mask_latents.shape[1], n_ref,
                                                         *mask_latents.shape[3:]), mask_latents], dim=2)

    return torch.cat([video_latents, mask_latents], dim=1)
