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
import re
import zipfile
from typing import Dict, List, Optional, Sequence, Union

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


# ---------------------------------------------------------------------------
# the Wan2.1 release files at any size (sizes read from the tensors)
# ---------------------------------------------------------------------------
VAE_FILE = 'Wan2.1_VAE.pth'
TEXT_ENCODER_FILE = 'models_t5_umt5-xxl-enc-bf16.pth'
TOKENIZER_DIR = os.path.join('google', 'umt5-xxl')
TEXT_LEN = 512
# Wan2.1's VAE (diffsynth VideoVAE_ defaults): these are not in the file
_VAE_FIXED = dict(z_dim=16, dim_mult=[1, 2, 4, 4], attn_scales=[], temperal_downsample=[False, True, True],
                  dropout=0.0)
_RELEASE_VAE = dict(dim=96, num_res_blocks=2)
_RELEASE_UMT5 = dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                     num_buckets=32, shared_pos=False)


def tiny_codec_kind(path: str) -> Optional[str]:
    """``'TinyWanVAE'`` / ``'TinyTextEncoder'`` when ``path`` is one of the demo's
    tiny-codec files (read from the pickle's text, without loading tensors), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
        if not pickles:
            return None
        text = archive.read(pickles[0])
    for kind in ('TinyWanVAE', 'TinyTextEncoder'):
        if kind.encode() in text:
            return kind
    return None


def _load_checked(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, field: str) -> None:
    from vdot_ext.models.checkpoint_io import check_state_dict
    check_state_dict(module, state, path, f'{type(module).__name__} ({field})')
    module.load_state_dict(state, strict=True, assign=True)


def vae_architecture(state: Dict[str, torch.Tensor], path: str, field: str = '--vae') -> dict:
    """``VideoVAE_`` width and residual blocks per level of a Wan VAE state dict
    (converted keys ``model.encoder.…``)."""
    conv = state.get('model.encoder.conv1.weight')
    if conv is None:
        raise ValueError(f'{field}: {path} is not a Wan2.1 VAE (no "encoder.conv1.weight"; keys e.g. '
                         f'{sorted(state)[:3]})')
    levels = {int(m.group(1)) for k in state
              for m in [re.match(r'model\.encoder\.downsamples\.(\d+)\.', k)] if m}
    # per level: num_res_blocks residual blocks, then a resample (not after the last level)
    n_levels = len(_VAE_FIXED['dim_mult'])
    count = max(levels) + 1 if levels else 0
    if (count - (n_levels - 1)) % n_levels:
        raise ValueError(f'{field}: {path}: {count} encoder down-sampling modules do not fit Wan2.1\'s '
                         f'{n_levels} levels')
    return dict(dim=int(conv.shape[0]), num_res_blocks=(count - (n_levels - 1)) // n_levels)


def load_wan_vae(path: str, device: Union[str, torch.device] = 'cpu', field: str = '--vae') -> torch.nn.Module:
    """diffsynth ``WanVideoVAE`` (float32, frozen) from a Wan2.1 VAE file
    (``Wan2.1_VAE.pth``; its width read from the tensors), or the demo's ``TinyWanVAE``.

    At the release width this is diffsynth's own ``load_model`` with
    ``WanVideoVAEStateDictConverter``; a smaller file in the same key layout is
    loaded into ``WanVideoVAE`` whose inner ``VideoVAE_`` is built at that width
    (``WanVideoVAE`` hard-codes 96). Weights load safely and must be finite."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{field}: VAE file {path!r} does not exist')
    if tiny_codec_kind(path) == 'TinyWanVAE':
        from vdot_ext.models.tiny_codecs import TinyWanVAE
        with codec_file(field):  # safe load, finite check: TinyWanVAE.load
            return TinyWanVAE.load(path).to(device)
    from diffsynth.core.loader.model import load_model
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE
    from diffsynth.utils.state_dict_converters.wan_video_vae import WanVideoVAEStateDictConverter
    state = WanVideoVAEStateDictConverter(load_codec_state(path, field, torch.float32))
    arch = vae_architecture(state, path, field)
    if arch == _RELEASE_VAE:
        vae = load_model(WanVideoVAE, path, torch_dtype=torch.float32, device=device, state_dict=state)
    else:
        with skip_model_initialization():
            vae = WanVideoVAE(z_dim=_VAE_FIXED['z_dim'])
            vae.model = VideoVAE_(dim=arch['dim'], num_res_blocks=arch['num_res_blocks'], **_VAE_FIXED)
        _load_checked(vae, state, path, field)
        vae.to(device=device, dtype=torch.float32)
    return vae.eval().requires_grad_(False)


def wan_vae_of(vae) -> torch.nn.Module:
    """The diffsynth ``WanVideoVAE`` behind ``vae`` (itself, or a ``TinyWanVAE``'s)."""
    return getattr(vae, 'wan_vae', vae)


def umt5_architecture(state: Dict[str, torch.Tensor], path: str, field: str = '--text_encoder') -> dict:
    """``WanTextEncoder`` arguments of a umT5 encoder state dict (Wan2.1's layout)."""
    need = ('token_embedding.weight', 'blocks.0.attn.q.weight', 'blocks.0.ffn.fc1.weight')
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f'{field}: {path} is not a umT5 encoder in Wan2.1\'s layout (missing {missing}; '
                         f'keys e.g. {sorted(state)[:3]})')
    layers = {int(m.group(1)) for k in state for m in [re.match(r'blocks\.(\d+)\.', k)] if m}
    shared = 'pos_embedding.embedding.weight' in state
    pos = state['pos_embedding.embedding.weight' if shared else 'blocks.0.pos_embedding.embedding.weight']
    vocab, dim = state['token_embedding.weight'].shape
    return dict(vocab=int(vocab), dim=int(dim), dim_attn=int(state['blocks.0.attn.q.weight'].shape[0]),
                dim_ffn=int(state['blocks.0.ffn.fc1.weight'].shape[0]), num_heads=int(pos.shape[1]),
                num_layers=max(layers) + 1, num_buckets=int(pos.shape[0]), shared_pos=shared)


class UMT5Encoder:
    """umT5 encoder + tokenizer from local files: ``encode(prompts) → [B, 512, dim]``
    float32, zero past each prompt's tokens (diffsynth
    ``WanVideoUnit_PromptEmbedder.encode_prompt``, per row).

    The encoder is diffsynth's ``WanTextEncoder`` built with the architecture the
    file holds (:func:`umt5_architecture`): at the release size exactly
    diffsynth's ``load_model``; smaller files in the same key layout load through
    the same class. The tokenizer is ``HuggingfaceTokenizer`` (``clean='whitespace'``).
    ``field``/``tokenizer_field`` name the options in error messages.
    """

    def __init__(self, checkpoint: str, tokenizer: str, device='cpu', dtype: torch.dtype = torch.bfloat16,
                 seq_len: int = TEXT_LEN, field: str = '--text_encoder', tokenizer_field: str = '--tokenizer'):
        from diffsynth.core.loader.model import load_model
        from diffsynth.core.vram.initialization import skip_model_initialization
        from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
        if not checkpoint or not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'{field}: file {checkpoint!r} does not exist')
        if not tokenizer or not os.path.isdir(tokenizer):
            raise FileNotFoundError(f'{tokenizer_field}: {tokenizer!r} is not a folder with the umT5 tokenizer '
                                    f'(the {TOKENIZER_DIR} folder of a Wan2.1 release)')
        state = load_codec_state(checkpoint, field, dtype)
        arch = umt5_architecture(state, checkpoint, field)
        if arch == _RELEASE_UMT5:
            self.model = load_model(WanTextEncoder, checkpoint, torch_dtype=dtype, device=device, state_dict=state)
        else:
            with skip_model_initialization():
                self.model = WanTextEncoder(**arch, dropout=0.0)
            _load_checked(self.model, state, checkpoint, field)
            self.model.to(device=device, dtype=dtype)
        self.model.eval().requires_grad_(False)
        try:
            self.tokenizer = HuggingfaceTokenizer(name=tokenizer, seq_len=seq_len, clean='whitespace')
        except (OSError, ValueError) as exc:
            raise ValueError(f'{tokenizer_field}: cannot load a tokenizer from {tokenizer}: {exc}') from None
        if self.tokenizer.vocab_size > arch['vocab']:
            raise ValueError(f'{tokenizer_field}: {tokenizer} has {self.tokenizer.vocab_size} tokens but the text '
                             f'encoder {checkpoint} embeds {arch["vocab"]}')
        self.dim = arch['dim']

    def to(self, device):
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(list(prompts), return_mask=True, add_special_tokens=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        lengths = mask.gt(0).sum(dim=1).long()
        emb = self.model(ids, mask)
        for row, length in enumerate(lengths):
            emb[row, length:] = 0
        return emb.float()


class UMT5PromptEncoder(UMT5Encoder):
    """:class:`UMT5Encoder` as the training data path builds it (positional
    ``seq_len`` before ``device``; errors name the ``codec.text_encoder`` fields)."""

    def __init__(self, checkpoint: str, tokenizer: str, seq_len: int = TEXT_LEN,
                 device: str = 'cpu', dtype: torch.dtype = torch.bfloat16):
        super().__init__(checkpoint, tokenizer, device=device, dtype=dtype, seq_len=seq_len,
                         field='codec.text_encoder.checkpoint', tokenizer_field='codec.text_encoder.tokenizer')


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
            else:  # a Wan2.1 VAE file at any width (release or real-layout stand-in)
                self._vae = load_wan_vae(cfg['checkpoint'], self.device, field)
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
