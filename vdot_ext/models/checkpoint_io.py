"""Loading real Wan2.1 / VACE-Wan2.1 checkpoints into ``WanVACEScore``.

Files are read with diffsynth's own loader (``diffsynth.core.loader.file.
load_state_dict``: safetensors, or torch ``.pth/.bin`` with weights_only) and
split with diffsynth's state-dict converters, exactly as
``diffsynth.configs.model_configs`` routes the Wan2.1-VACE-14B release:

- DiT part: ``WanVideoDiTStateDictConverter`` (drops ``vace*`` keys, strips a
  ``model.`` prefix) for the official Wan2.1 layout (``blocks.0.self_attn.q.
  weight``, ``patch_embedding.weight``, ``head.head.weight``), or
  ``WanVideoDiTFromDiffusers`` for the diffusers layout
  (``condition_embedder.*``, ``blocks.0.attn1.to_q.weight``, ``proj_out.*``);
- VACE part: ``VaceWanModelDictConverter`` (keeps ``vace_blocks.*``,
  ``vace_patch_embedding.*``): one set of VACE files yields both parts.

Then every key and shape is checked against the module before assigning, so a
wrong or partial checkpoint fails with the offending keys and files named.
"""
import glob
import json
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from vdot_ext.utils import assert_finite_state_dict

PathLike = Union[str, os.PathLike]
_GLOB_CHARS = set('*?[')
_SHOW = 8  # keys listed per category in error messages


class WanVACEStateDicts(NamedTuple):
    dit: Dict[str, torch.Tensor]
    vace: Optional[Dict[str, torch.Tensor]]
    files: List[str]


def resolve_checkpoint_files(paths: Union[PathLike, Sequence[PathLike]],
                             field: str = 'pretrained') -> List[str]:
    """Expand ``paths`` into existing checkpoint files.

    Each entry may be a file, a directory (all ``*.safetensors`` in it, sorted:
    a sharded release ``diffusion_pytorch_model-0000k-of-0000n``), a
    ``*.safetensors.index.json`` (its weight_map's shards) or a glob pattern.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise FileNotFoundError(f'{field}: no checkpoint path given')
    files: List[str] = []
    for path in paths:
        if _GLOB_CHARS & set(os.path.basename(path)):
            found = sorted(glob.glob(path))
            if not found:
                raise FileNotFoundError(
                    f'{field}: pattern {path!r} matches no file')
            files += found
        elif os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, '*.safetensors')))
            if not found:
                raise FileNotFoundError(
                    f'{field}: directory {path!r} contains no *.safetensors '
                    f'file')
            files += found
        elif not os.path.isfile(path):
            raise FileNotFoundError(
                f'{field}: checkpoint file {path!r} does not exist')
        elif path.endswith('.index.json'):
            with open(path) as f:
                weight_map = json.load(f).get('weight_map')
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f'{field}: {path!r} has no "weight_map"')
            root = os.path.dirname(path)
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(root, shard)
                if not os.path.isfile(shard_path):
                    raise FileNotFoundError(
                        f'{field}: shard {shard_path!r} listed in {path!r} '
                        f'does not exist')
                files.append(shard_path)
        else:
            files.append(path)
    # the same shard given twice (e.g. directory + file) is read once
    return list(dict.fromkeys(files))


def is_diffusers_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Diffusers' WanTransformer3DModel names (``condition_embedder``,
    ``attn1``, ``proj_out``) instead of the official Wan2.1 ones."""
    return any(k.startswith('condition_embedder.') or '.attn1.' in k
               or k.startswith('proj_out.') for k in state_dict)


def convert_dit_state_dict(state_dict: Dict[str, torch.Tensor]
                           ) -> Dict[str, torch.Tensor]:
    """Raw checkpoint keys -> ``WanModel`` keys via diffsynth's converters."""
    from diffsynth.utils.state_dict_converters.wan_video_dit import (
        WanVideoDiTFromDiffusers,
        WanVideoDiTStateDictConverter,
    )
    if is_diffusers_layout(state_dict):
        return WanVideoDiTFromDiffusers(state_dict)
    return WanVideoDiTStateDictConverter(state_dict)


def convert_vace_state_dict(state_dict: Dict[str, torch.Tensor]
                            ) -> Dict[str, torch.Tensor]:
    """Raw checkpoint keys -> ``VaceWanModel`` keys (diffsynth converter)."""
    from diffsynth.utils.state_dict_converters.wan_video_vace import VaceWanModelDictConverter
    return VaceWanModelDictConverter(state_dict)


def load_checkpoint_files(files: Sequence[str],
                          torch_dtype: Optional[torch.dtype] = None
                          ) -> Dict[str, torch.Tensor]:
    """All tensors of ``files`` (diffsynth's loader: safetensors, or torch
    files with ``weights_only=True``), duplicates rejected. A file that fails
    to load, or holds NaN/Inf, is an error naming it."""
    from diffsynth.core.loader.file import load_state_dict
    merged: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for path in files:
        try:
            part = load_state_dict(path, torch_dtype=torch_dtype, device='cpu')
        except Exception as exc:
            raise ValueError(f'cannot load checkpoint file {path!r}: {exc}') from exc
        assert_finite_state_dict(part, path)
        for key in part:
            if key in origin:
                raise ValueError(
                    f'checkpoint key {key!r} appears in both {origin[key]!r} '
                    f'and {path!r}')
            origin[key] = path
        merged.update(part)
    return merged


def load_wan_vace_state_dict(paths: Union[PathLike, Sequence[PathLike]],
                             has_vace: bool,
                             *,
                             torch_dtype: Optional[torch.dtype] = None,
                             field: str = 'pretrained') -> WanVACEStateDicts:
    """Read Wan2.1 (T2V) or VACE-Wan2.1 checkpoint files.

    Returns ``(dit_state_dict, vace_state_dict or None, files)``; the VACE part
    is required (and returned) only when ``has_vace``.
    """
    files = resolve_checkpoint_files(paths, field)
    raw = load_checkpoint_files(files, torch_dtype)
    dit_sd = convert_dit_state_dict(raw)
    if not dit_sd:
        raise ValueError(
            f'{field}: no Wan DiT weights found in {files} (expected keys '
            f'like "blocks.0.self_attn.q.weight"; found e.g. '
            f'{sorted(raw)[:_SHOW]})')
    vace_sd = None
    if has_vace:
        if is_diffusers_layout(raw):
            raise ValueError(
                f'{field}: {files} are in the diffusers layout; the VACE part '
                f'can only be read from the official VACE-Wan2.1 layout '
                f'(vace_blocks.*, vace_patch_embedding.*)')
        vace_sd = convert_vace_state_dict(raw)
        if not vace_sd:
            raise ValueError(
                f'{field}: the model has VACE blocks but {files} contain no '
                f'VACE weights (keys vace_blocks.*, vace_patch_embedding.*); '
                f'give the VACE-Wan2.1 release files or build a T2V model')
    return WanVACEStateDicts(dit_sd, vace_sd, files)


def check_state_dict(module: nn.Module, state_dict: Dict[str, torch.Tensor],
                     source: str, what: str) -> None:
    """Raise ValueError listing missing / unexpected / mis-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model '
        f'{tuple(expected[k].shape)}' for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for name, keys in (('missing', missing), ('unexpected', unexpected),
                       ('shape mismatch', mismatched)):
        if keys:
            more = f' (+{len(keys) - _SHOW} more)' if len(keys) > _SHOW else ''
            problems.append(f'{name} [{len(keys)}]: {keys[:_SHOW]}{more}')
    if problems:
        raise ValueError(
            f'cannot load {what} from {source}: ' + '; '.join(problems))


def load_state_dict_checked(module: nn.Module,
                            state_dict: Dict[str, torch.Tensor],
                            files: Union[str, Sequence[str]],
                            what: str) -> None:
    """Check every key/shape, then assign (works on 'meta'-built modules)."""
    source = files if isinstance(files, str) else ', '.join(files)
    check_state_dict(module, state_dict, source, what)
    module.load_state_dict(state_dict, strict=True, assign=True)
