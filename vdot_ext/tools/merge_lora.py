"""Merge a LoRA checkpoint into full weights: W' = W + (α / r) · B A.

    python -m vdot_ext.tools.merge_lora \
        --lora work_dirs/vdot_wan14b_lora/iter_1200.pth/lora_generator.pth \
        --base /ckpt/Wan2.1-VACE-14B /work/stage1/final_model.pth \
        --out generator_merged.safetensors --release-layout

``--lora``: a ``lora_<module>.pth`` written by RoleDeepSpeedStrategy (keys like
``dit.blocks.0.self_attn.q.lora_A.default.weight`` plus its ``lora_config``),
or an mmengine checkpoint of the plain Runner (``--lora-prefix generator.``).

``--base``: the weights the LoRA was trained on, in order, later ones
overriding earlier keys: Wan/VACE release safetensors (a folder, index.json
or files; read with diffsynth's loader through ``checkpoint_io``) and/or
torch/mmengine ``.pth`` files whose keys start with ``--base-prefix``
(default ``generator.``). For stage 2 (AccWanInit) give the VACE release
first and the stage-1 ``final_model.pth`` second: that is exactly the
generator's initial state.

``--out``: ``.safetensors`` or ``.pth``; keys in ``WanVACEScore`` layout
(``dit.*``, ``vace.*``) or, with ``--release-layout``, in the Wan/VACE release
layout (loadable as ``WanVACEScore(pretrained=...)``).
"""
import argparse
import os
from typing import Dict, List, Optional

import torch

from vdot_ext.models.lora import is_lora_key, lora_scale, merge_lora_state_dict


def read_lora(path: str, prefix: str = '', config: Optional[dict] = None):
    """(lora_state_dict, lora_config) from a LoRA file or an mmengine checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--lora: {path!r} does not exist')
    obj = torch.load(path, map_location='cpu', weights_only=False)
    if not isinstance(obj, dict) or 'state_dict' not in obj:
        raise ValueError(f'--lora: {path!r} holds no "state_dict"')
    state = {k[len(prefix):]: v for k, v in obj['state_dict'].items()
             if k.startswith(prefix) and is_lora_key(k)}
    if not state:
        raise ValueError(f'--lora: {path!r} has no LoRA keys (".lora_A."/".lora_B.") '
                         f'under prefix {prefix!r}')
    config = config or obj.get('lora_config')
    if config is None:
        raise ValueError(f'--lora: {path!r} has no lora_config; give --rank and --alpha')
    return state, config


def read_base(paths: List[str], prefix: str, with_vace: bool) -> Dict[str, torch.Tensor]:
    """Base weights in WanVACEScore layout (``dit.*``/``vace.*``)."""
    from vdot_ext.models.checkpoint_io import load_wan_vace_state_dict
    from vdot_ext.models.weights import read_state_dict
    base: Dict[str, torch.Tensor] = {}
    for path in paths:
        if path.endswith(('.pth', '.pt', '.ckpt', '.bin')) and os.path.isfile(path):
            state = read_state_dict(path, field='--base')
            part = {k[len(prefix):]: v for k, v in state.items()
                    if k.startswith(prefix) and not is_lora_key(k)}
            if not part:
                raise ValueError(f'--base: {path!r} has no keys under prefix {prefix!r}')
            part = {k.replace('.base_layer.', '.'): v for k, v in part.items()}
        else:
            parts = load_wan_vace_state_dict(path, has_vace=with_vace, field='--base')
            part = {f'dit.{k}': v for k, v in parts.dit.items()}
            if parts.vace is not None:
                part.update({f'vace.{k}': v for k, v in parts.vace.items()})
        base.update(part)
    return base


def to_release_layout(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ('dit.', 'vace.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description='Merge LoRA weights into full weights')
    parser.add_argument('--lora', required=True)
    parser.add_argument('--lora-prefix', default='')
    parser.add_argument('--base', nargs='+', required=True)
    parser.add_argument('--base-prefix', default='generator.')
    parser.add_argument('--rank', type=int, default=None)
    parser.add_argument('--alpha', type=float, default=None)
    parser.add_argument('--out', required=True)
    parser.add_argument('--release-layout', action='store_true')
    args = parser.parse_args(argv)
    config = dict(rank=args.rank, alpha=args.alpha) if args.rank else None
    if config and config['alpha'] is None:
        config['alpha'] = args.rank
    lora, config = read_lora(args.lora, args.lora_prefix, config)
    with_vace = any(k.startswith('vace.') for k in lora) or any(
        os.path.isdir(p) or p.endswith('.safetensors') for p in args.base) and any(
        k.startswith('vace.') for k in lora)
    base = read_base(args.base, args.base_prefix, with_vace)
    merged = merge_lora_state_dict(base, lora, lora_scale(config),
                                   source=', '.join(args.base))
    if args.release_layout:
        merged = to_release_layout(merged)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith('.safetensors'):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in merged.items()}, args.out)
    else:
        torch.save({'state_dict': merged}, args.out)
    print(f'merged {len(lora) // 2} LoRA layers (scale {lora_scale(config):g}) into '
          f'{len(merged)} tensors -> {args.out}')
    return merged


if __name__ == '__main__':
    main()
