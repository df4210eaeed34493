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

The loaders live in the VCU data path (``vdot_ext.patches.vcu_codecs``), so
training, ``precompute_vcu`` and inference read the same files through the same
code; this module re-exports them and adds the inference-side helpers.
"""
import os.path as osp
from typing import Dict, Optional, Sequence

import torch

from vdot_ext.patches.vcu_codecs import (
    TEXT_ENCODER_FILE,
    TEXT_LEN,
    TOKENIZER_DIR,
    VAE_FILE,
    UMT5Encoder,
    load_codec_state,
    load_wan_vae,
    tiny_codec_kind,
    umt5_architecture,
    vae_architecture,
    wan_vae_of,
)


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


__all__ = ['load_wan_vae', 'load_text_encoder', 'load_codec_state', 'UMT5Encoder', 'TinyEncoderAdapter', 'wan_vae_of',
           'default_codec_paths', 'vae_architecture', 'umt5_architecture', 'tiny_codec_kind', 'VAE_FILE',
           'TEXT_ENCODER_FILE', 'TOKENIZER_DIR', 'TEXT_LEN']
