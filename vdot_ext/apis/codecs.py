"""The frozen codecs at inference: the Wan VAE, the umT5 text encoder and its
tokenizer, from their release files (docs/DESIGN.md §3, §8).

The files are the ones Wan2.1 ships (``Wan2.1_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth``, the ``google/umt5-xxl`` tokenizer folder)
and are read as diffsynth reads them: the VAE's keys through
``WanVideoVAEStateDictConverter`` into ``WanVideoVAE``, the encoder's keys as
they are into ``WanTextEncoder``, the tokenizer with ``HuggingfaceTokenizer``
(``clean='whitespace'``, 512 tokens). Both model classes are built with the
architecture the file holds (read from its tensor shapes): at the release sizes
that is exactly diffsynth's own construction (``load_model`` with the config of
``diffsynth/configs/model_configs.py``); smaller files in the same key layout
(the tests' tiny stand-ins) load through the same code. The demo's tiny codecs
(``TinyWanVAE`` / ``TinyTextEncoder`` ``.pth`` files) are accepted too.

Weights are read without unpickling code and checked finite (docs/DESIGN.md §8).
The text encoder zeroes embeddings past each prompt's length, as diffsynth's
``WanVideoUnit_PromptEmbedder`` does.
"""
import logging
import os.path as osp
import re
import zipfile
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from vdot_ext.utils import assert_finite_state_dict, load_tensor_file

logger = logging.getLogger(__name__)

VAE_FILE = 'Wan2.1_VAE.pth'
TEXT_ENCODER_FILE = 'models_t5_umt5-xxl-enc-bf16.pth'
TOKENIZER_DIR = osp.join('google', 'umt5-xxl')
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


def _load_state(path: str, field: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    state = load_tensor_file(path, field=field)
    if not state:
        raise ValueError(f'{field}: {path} holds no tensors')
    assert_finite_state_dict(state, f'{field} {path}', 'codec weights')
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------
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


def load_wan_vae(path: str, device: Union[str, torch.device] = 'cpu', field: str = '--vae') -> nn.Module:
    """diffsynth ``WanVideoVAE`` (float32, frozen) from a Wan2.1 VAE file, or the
    demo's ``TinyWanVAE``."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'{field}: VAE file {path!r} does not exist')
    if tiny_codec_kind(path) == 'TinyWanVAE':
        from vdot_ext.models.tiny_codecs import TinyWanVAE
        return TinyWanVAE.load(path).to(device)
    from diffsynth.core.loader.model import load_model
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE
    from diffsynth.utils.state_dict_converters.wan_video_vae import WanVideoVAEStateDictConverter
    state = WanVideoVAEStateDictConverter(_load_state(path, field, torch.float32))
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


def wan_vae_of(vae) -> nn.Module:
    """The diffsynth ``WanVideoVAE`` behind ``vae`` (itself, or a ``TinyWanVAE``'s)."""
    return getattr(vae, 'wan_vae', vae)


# ---------------------------------------------------------------------------
# text encoder
# ---------------------------------------------------------------------------
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
    """umT5 encoder + tokenizer: ``encode(prompts) → [B, 512, dim]`` float32, zero
    past each prompt's tokens (diffsynth ``WanVideoUnit_PromptEmbedder``)."""

    def __init__(self, checkpoint: str, tokenizer: str, device='cpu', dtype: torch.dtype = torch.bfloat16,
                 seq_len: int = TEXT_LEN):
        from diffsynth.core.loader.model import load_model
        from diffsynth.core.vram.initialization import skip_model_initialization
        from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'--text_encoder: file {checkpoint!r} does not exist')
        if not tokenizer or not osp.isdir(tokenizer):
            raise FileNotFoundError(f'--tokenizer: {tokenizer!r} is not a folder with the umT5 tokenizer '
                                    f'(the {TOKENIZER_DIR} folder of a Wan2.1 release)')
        state = _load_state(checkpoint, '--text_encoder', dtype)
        arch = umt5_architecture(state, checkpoint)
        if arch == _RELEASE_UMT5:
            self.model = load_model(WanTextEncoder, checkpoint, torch_dtype=dtype, device=device, state_dict=state)
        else:
            with skip_model_initialization():
                self.model = WanTextEncoder(**arch, dropout=0.0)
            _load_checked(self.model, state, checkpoint, '--text_encoder')
            self.model.to(device=device, dtype=dtype)
        self.model.eval().requires_grad_(False)
        try:
            self.tokenizer = HuggingfaceTokenizer(name=tokenizer, seq_len=seq_len, clean='whitespace')
        except (OSError, ValueError) as exc:
            raise ValueError(f'--tokenizer: cannot load a tokenizer from {tokenizer}: {exc}') from None
        if self.tokenizer.vocab_size > arch['vocab']:
            raise ValueError(f'--tokenizer: {tokenizer} has {self.tokenizer.vocab_size} tokens but the text encoder '
                             f'{checkpoint} embeds {arch["vocab"]}')
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


class TinyEncoderAdapter:
    """The demo's ``TinyTextEncoder`` behind the same interface."""

    def __init__(self, checkpoint: str, device='cpu'):
        from vdot_ext.models.tiny_codecs import TinyTextEncoder
        self.model = TinyTextEncoder.load(checkpoint).to(device)
        self.dim = self.model.dim

    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids, mask = self.model.tokenizer(list(prompts), return_mask=True, add_special_tokens=True)
        emb = self.model.encoder(ids.to(device), mask.to(device))
        for row, length in enumerate(mask.gt(0).sum(dim=1)):
            emb[row, int(length):] = 0
        return emb.float()


def load_text_encoder(path: str, tokenizer: Optional[str], device='cpu', dtype: torch.dtype = torch.bfloat16):
    """A umT5 encoder (+ tokenizer folder), or the demo's ``TinyTextEncoder`` file."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'--text_encoder: file {path!r} does not exist')
    if tiny_codec_kind(path) == 'TinyTextEncoder':
        return TinyEncoderAdapter(path, device)
    return UMT5Encoder(path, tokenizer, device=device, dtype=dtype)


def _load_checked(module: nn.Module, state: Dict[str, torch.Tensor], path: str, field: str) -> None:
    from vdot_ext.models.checkpoint_io import check_state_dict
    check_state_dict(module, state, path, f'{type(module).__name__} ({field})')
    module.load_state_dict(state, strict=True, assign=True)


def default_codec_paths(folder: Optional[str]) -> Dict[str, Optional[str]]:
    """The codec files of a Wan2.1 / VDOT model folder, where they exist:
    ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl``."""
    out: Dict[str, Optional[str]] = dict(vae=None, text_encoder=None, tokenizer=None)
    if not folder or not osp.isdir(folder):
        return out
    for key, name, test in (('vae', VAE_FILE, osp.isfile), ('text_encoder', TEXT_ENCODER_FILE, osp.isfile),
                            ('tokenizer', TOKENIZER_DIR, osp.isdir)):
        for base in (folder, osp.dirname(osp.abspath(folder))):
            if test(osp.join(base, name)):
                out[key] = osp.join(base, name)
                break
    return out


__all__ = ['load_wan_vae', 'load_text_encoder', 'UMT5Encoder', 'wan_vae_of', 'default_codec_paths',
           'vae_architecture', 'umt5_architecture', 'tiny_codec_kind']
