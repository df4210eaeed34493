"""Tiny checkpoints in the *real* release layouts, written by tests (no network).

Each writer produces the file names and key layout of the official Wan2.1 /
VACE-Wan2.1 release, only with small tensors, so that the code under test reads
them exactly as it reads the real files (diffsynth's loaders and state-dict
converters; names from ``diffsynth/configs/model_configs.py``):

* DiT / VACE: ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` +
  ``diffusion_pytorch_model.safetensors.index.json``, DiT keys
  (``blocks.0.self_attn.q.weight``, ``head.head.weight``, ...) and VACE keys
  (``vace_blocks.0.before_proj.weight``, ``vace_patch_embedding.weight``) side by
  side, no prefix (Wan-AI/Wan2.1-VACE-14B);
* VAE: ``Wan2.1_VAE.pth``, a plain torch state dict of diffsynth's ``VideoVAE_``
  keys without the ``model.`` prefix (``WanVideoVAEStateDictConverter`` adds it);
* text encoder: ``models_t5_umt5-xxl-enc-bf16.pth``, a bf16 state dict of
  ``WanTextEncoder`` keys (``token_embedding.weight``, ``blocks.0.attn.q.weight``,
  ``blocks.0.pos_embedding.embedding.weight``, ``norm.weight``);
* tokenizer: ``google/umt5-xxl/`` with a ``tokenizer.json`` (a word-level
  tokenizer built in code with ``tokenizers``: ``<pad>`` 0, ``</s>`` 1, ``<unk>``
  2 as in umT5, ``</s>`` appended) that ``AutoTokenizer.from_pretrained`` reads.

``write_wan_release_folder`` puts all of them where a Wan2.1 model folder has
them.
"""
import json
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file

DIT_SHARD = 'diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors'
DIT_INDEX = 'diffusion_pytorch_model.safetensors.index.json'
VAE_FILE = 'Wan2.1_VAE.pth'
TEXT_ENCODER_FILE = 'models_t5_umt5-xxl-enc-bf16.pth'
TOKENIZER_DIR = osp.join('google', 'umt5-xxl')

# a small vocabulary covering the tests' prompts
WORDS = ('a red ball rolls on green grass the cat jumps over blue box video of person walking '
         'dog runs in park sunset sky bright colourful scene slow motion camera pans left right').split()


def release_state_dict(model) -> Dict[str, torch.Tensor]:
    """A ``WanVACEScore``'s weights in the release layout (no ``dit.``/``vace.`` prefix)."""
    sd = {k: v.detach().clone() for k, v in model.dit.state_dict().items()}
    if model.vace is not None:
        sd.update({k: v.detach().clone() for k, v in model.vace.state_dict().items()})
    return sd


def _natural(key: str):
    return tuple(int(p) if p.isdigit() else p for p in key.split('.'))


def write_dit_release(state: Dict[str, torch.Tensor], folder: str, shards: int = 2,
                      config: Optional[dict] = None) -> List[str]:
    """Sharded safetensors + index (+ ``config.json`` when given), as the release."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(state, key=_natural)
    per = -(-len(keys) // shards)
    names, weight_map = [], {}
    for i in range(shards):
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        name = DIT_SHARD.format(i=i + 1, n=shards)
        save_file(part, osp.join(folder, name), metadata={'format': 'pt'})
        names.append(osp.join(folder, name))
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(osp.join(folder, DIT_INDEX), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
    if config is not None:
        with open(osp.join(folder, 'config.json'), 'w') as f:
            json.dump(config, f)
    return names


def tiny_vace_release(folder: str, preset: str = 'tiny-vace', seed: int = 0, shards: int = 2,
                      with_config: bool = True):
    """A tiny (VACE-)Wan DiT written as a release; returns ``(model, files)``."""
    from vdot_ext.apis.export import release_config
    from vdot_ext.models.wan_vace_score import WanVACEScore
    torch.manual_seed(seed)
    model = WanVACEScore(preset).eval()
    files = write_dit_release(release_state_dict(model), folder, shards,
                              release_config(model.arch) if with_config else None)
    return model, files


def write_wan_vae(path: str, dim: int = 8, num_res_blocks: int = 1, seed: int = 0) -> str:
    """``Wan2.1_VAE.pth``: diffsynth ``VideoVAE_`` keys (no ``model.`` prefix), small width."""
    from diffsynth.models.wan_video_vae import VideoVAE_
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VideoVAE_(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=num_res_blocks,
                        attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
        # small output weights keep the random decoder's pixels in a sane range
        for name, p in vae.named_parameters():
            if p.ndim > 1:
                p.data.mul_(0.5)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    torch.save({k: v.clone() for k, v in vae.state_dict().items()}, path)
    return path


def write_tokenizer(folder: str, words: Sequence[str] = WORDS) -> str:
    """A umT5-style tokenizer folder (pad 0, eos ``</s>`` 1, unk 2, eos appended)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token='<unk>'))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single='$A </s>', pair='$A </s> $B </s>',
                                                       special_tokens=[('</s>', 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', eos_token='</s>', unk_token='<unk>')
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def write_umt5(path: str, vocab: int, dim: int = 32, dim_attn: int = 32, dim_ffn: int = 64,
               num_heads: int = 2, num_layers: int = 2, num_buckets: int = 32, seed: int = 0) -> str:
    """``models_t5_umt5-xxl-enc-bf16.pth``: a bf16 ``WanTextEncoder`` state dict."""
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = WanTextEncoder(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                             num_layers=num_layers, num_buckets=num_buckets, shared_pos=False, dropout=0.0)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    torch.save({k: v.to(torch.bfloat16).clone() for k, v in enc.state_dict().items()}, path)
    return path


def write_wan_release_folder(folder: str, preset: str = 'tiny-vace', seed: int = 0, shards: int = 2,
                             text_dim: int = 32, codec_seed: Optional[int] = None) -> dict:
    """A tiny Wan2.1 model folder: DiT/VACE shards + index + config.json, VAE,
    umT5 and tokenizer. Returns the paths and the DiT module it was made from.
    ``codec_seed`` (default ``seed``) seeds the VAE and umT5: folders written with
    the same one hold the same codec files, as every Wan2.1 release does."""
    model, files = tiny_vace_release(folder, preset, seed, shards)
    codec_seed = seed if codec_seed is None else codec_seed
    tokenizer = write_tokenizer(osp.join(folder, TOKENIZER_DIR))
    with open(osp.join(tokenizer, 'tokenizer.json'), encoding='utf-8') as f:
        vocab = len(json.load(f)['model']['vocab'])
    text_encoder = write_umt5(osp.join(folder, TEXT_ENCODER_FILE), vocab=vocab, dim=text_dim, seed=codec_seed + 1)
    vae = write_wan_vae(osp.join(folder, VAE_FILE), seed=codec_seed + 2)
    return dict(folder=folder, model=model, dit_files=files, vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer)


def write_video(path: str, frames: int = 5, height: int = 64, width: int = 64, seed: int = 0,
                kind: str = 'gradient') -> str:
    """A small mp4 (H.264) with moving content; ``kind='mask'`` writes a white box
    on black (white = generate)."""
    import numpy as np

    from vdot_ext.data.video_io import write_mp4
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    if kind == 'mask':
        video = np.zeros((frames, height, width, 3), np.uint8)
        video[:, height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    else:
        base = rng.integers(0, 255, size=3)
        r = (x * 3 + t * 7 + base[0]) % 256
        g = (y * 3 + base[1]) % 256
        b = ((x + y) * 2 + t * 5 + base[2]) % 256
        video = np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)
    return write_mp4(path, video, fps=8, crf=10)


def write_image(path: str, height: int = 48, width: int = 40, seed: int = 0) -> str:
    import numpy as np

    from vdot_ext.data.video_io import write_png
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 255, np.uint8)
    image[height // 4:3 * height // 4, width // 4:3 * width // 4] = rng.integers(0, 255, size=3)
    return write_png(path, image)


def natural_keys(keys) -> List[str]:
    return sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r'(\d+)', k)])
