"""The frozen codecs of the VCU data path: the Wan VAE and the text encoder.

:class:`VCUCodecs` builds both from a ``codec`` config (tiny stand-ins for the
demo and tests, or diffsynth's ``WanVideoVAE`` / umT5 ``WanTextEncoder`` from
local checkpoints) and encodes a batch of VCU pixels into what the trainer reads
(docs/DESIGN.md §3, §4)::

    context       [L, text_dim]                   text embedding
    latents       [16, n_ref + F_lat, H/8, W/8]   VAE latents, references prepended
    vace_context  [96, n_ref + F_lat, H/8, W/8]   encode_vcu(F, M, refs)

Weights load through :mod:`vdot_ext.utils` (docs/DESIGN.md §8): never by
unpickling code, and a checkpoint holding NaN/Inf is a
:class:`~vdot_ext.utils.NonFiniteError` naming the file. The models load lazily
(first encode), so a dataset can be built and pickled into DataLoader workers
without loading multi-GB weights in the main process.
"""
import contextlib
import hashlib
import os
from typing import Dict, List, Optional, Sequence

import torch

from vdot_ext.utils import NonFiniteError, UnsafeCheckpointError, assert_finite_state_dict, load_tensor_file

from .tasks import VCUPixels

VAE_TYPES = ('TinyWanVAE', 'WanVideoVAE')
TEXT_ENCODER_TYPES = ('TinyTextEncoder', 'WanTextEncoder')


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


def load_codec_state(path: str, field: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The tensors of a codec checkpoint (safetensors or a safely loaded torch
    file), checked finite, optionally cast to ``dtype``."""
    state = load_tensor_file(path, field=field)
    assert_finite_state_dict(state, f'{field} {path}', 'codec weights')
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


@contextlib.contextmanager
def codec_file(field: str):
    """Prefix load errors with the config field (``codec.vae.checkpoint``); the
    loaders' messages already name the file."""
    try:
        yield
    except (NonFiniteError, UnsafeCheckpointError, ValueError, FileNotFoundError) as exc:
        if str(exc).startswith(field):
            raise
        raise type(exc)(f'{field}: {exc}') from exc


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
        state = load_codec_state(checkpoint, 'codec.text_encoder.checkpoint', dtype)
        self.model = load_model(WanTextEncoder, checkpoint, torch_dtype=dtype, device=device,
                                state_dict=state)
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

    The VAE runs in float32 (``encode_vcu`` feeds float32 pixels). ``identity``
    (types, options, checkpoint fingerprints) is what the cache key records.
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
            cfg, field = self.vae_cfg, 'codec.vae.checkpoint'
            if cfg['type'] == 'TinyWanVAE':
                from vdot_ext.models.tiny_codecs import TinyWanVAE
                with codec_file(field):  # safe load, finite check: TinyWanVAE.load
                    self._vae = TinyWanVAE.load(cfg['checkpoint']).to(self.device)
            else:
                from diffsynth.core.loader.model import load_model
                from diffsynth.models.wan_video_vae import WanVideoVAE
                from diffsynth.utils.state_dict_converters.wan_video_vae import \
                    WanVideoVAEStateDictConverter
                state = load_codec_state(cfg['checkpoint'], field, torch.float32)
                self._vae = load_model(WanVideoVAE, cfg['checkpoint'], torch_dtype=torch.float32,
                                       device=self.device, state_dict=state,
                                       state_dict_converter=WanVideoVAEStateDictConverter)
                self._vae.eval().requires_grad_(False)
        return self._vae

    @property
    def text_encoder(self):
        if self._text is None:
            cfg = self.text_cfg
            if cfg['type'] == 'TinyTextEncoder':
                from vdot_ext.models.tiny_codecs import TinyTextEncoder
                with codec_file('codec.text_encoder.checkpoint'):  # safe, checked: TinyTextEncoder.load
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
