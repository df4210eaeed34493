"""Merge a LoRA adapter into full weights: W' = W + s · B A, s = α / r (docs/DESIGN.md §7).

    python -m vdot_ext.tools.merge_lora \
        --lora work_dirs/vdot_wan14b_lora/iter_1200.pth/lora_generator \
        --base /ckpt/Wan2.1-VACE-14B work_dirs/vdot_wan14b_stage1/export \
        --out generator_merged.safetensors --release-layout

``--lora``: an adapter folder in peft's layout (``adapter_config.json`` +
``adapter_model.safetensors``), as RoleDeepSpeedStrategy writes it
(``<checkpoint>/lora_<module>/``) and peft's ``save_pretrained`` does; a
``lora_<module>.pth`` of older versions; or an mmengine checkpoint of the
plain Runner (``--lora-prefix generator.``, with ``--rank``/``--alpha``).
Adapters the merge cannot reproduce are refused: initialisations that rewrote
the base weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA: the adapter alone
on the released base is off by s·B₀A₀), DoRA, per-layer rank/alpha patterns,
trained biases.

``--base``: the weights the LoRA was trained on, in order, later ones
overriding earlier keys: Wan/VACE release safetensors (a folder, index.json
or files; read with diffsynth's loader through ``checkpoint_io``) and/or
torch/mmengine ``.pth`` files whose keys start with ``--base-prefix``
(default ``generator.``). For stage 2 (AccWanInit) give the VACE release
first and the stage-1 ``final_model.pth`` second: that is exactly the
generator's initial state.

``--out``: ``.safetensors`` or ``.pth``, written atomically; keys in
``WanVACEScore`` layout (``dit.*``, ``vace.*``) or, with ``--release-layout``,
in the Wan/VACE release layout (loadable as ``WanVACEScore(pretrained=...)``).
"""
import argparse
import os
from typing import Dict, List

import torch

from vdot_ext.models.lora import (
    BASE_MARK,
    check_mergeable,
    is_lora_key,
    lora_scale,
    merge_lora_state_dict,
    read_lora_adapter,
)
from vdot_ext.utils import save_safetensors, save_torch


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
            part = {k.replace(BASE_MARK, '.'): v for k, v in part.items()}
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
    parser.add_argument('--lora', required=True, help='adapter folder (peft layout) or LoRA file')
    parser.add_argument('--lora-prefix', default='', help='key prefix of the LoRA in a training checkpoint')
    parser.add_argument('--base', nargs='+', required=True)
    parser.add_argument('--base-prefix', default='generator.')
    parser.add_argument('--rank', type=int, default=None, help='r, for a LoRA file without config')
    parser.add_argument('--alpha', type=float, default=None, help='α (default r), with --rank')
    parser.add_argument('--out', required=True)
    parser.add_argument('--release-layout', action='store_true')
    args = parser.parse_args(argv)
    default_config = None
    if args.rank:
        default_config = dict(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else args.rank)
    lora = read_lora_adapter(args.lora, args.lora_prefix, field='--lora', default_config=default_config)
    check_mergeable(lora.config, f'--lora {lora.source}')
    scale = lora_scale(lora.config)
    base = read_base(args.base, args.base_prefix, with_vace=any(k.startswith('vace.') for k in lora.state))
    merged = merge_lora_state_dict(base, lora.state, scale, source=', '.join(args.base))
    if args.release_layout:
        merged = to_release_layout(merged)
    if args.out.endswith('.safetensors'):
        save_safetensors(merged, args.out)
    else:
        save_torch({'state_dict': merged}, args.out)
    print(f'merged {len(lora.state) // 2} LoRA layers (scale {scale:g}) into {len(merged)} tensors -> {args.out}')
    return merged


if __name__ == '__main__':
    main()
