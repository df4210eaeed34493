"""Per-GPU memory plan of a VDOT config under RoleDeepSpeedStrategy.

    python -m vdot_ext.tools.plan_memory configs/vdot_wan14b.py --gpus 4

Parameter counts come from the config's own models built on the 'meta'
device (no memory, no weights). Bytes per GPU, per role, for N GPUs with
b = 2 (bf16/fp16) or 4 (fp32) bytes per weight and Adam(W):

    trainable P:  weights b·P, gradients b·P, optimizer 8·P (m, v in fp32)
                  + 4·P fp32 master copy when b = 2               (ZeRO paper, Rajbhandari et al. 2020)
                  ZeRO-1 divides the optimizer by N, ZeRO-2 also the
                  gradients, ZeRO-3 also the weights
    LoRA:         the base weights are frozen (b·P_base, /N under ZeRO-3);
                  gradients and optimizer only for the adapters
    frozen P:     b·P (the teacher), /N under ZeRO-3, no gradients/optimizer
    ZeRO-3 gather: the full weights of the blocks being computed,
                  ≈ 2 blocks (current + prefetch) · b per role in use

Activations (an estimate, not a measurement; batch B, tokens
T = F_lat·(H/16)·(W/16), width D, FFN width D_f, text length L_c):

    per block, stored for backward ≈ B·b·T·(10·D + 2·D_f) + B·b·2·L_c·D
    with gradient checkpointing: the block inputs B·b·T·D per block, plus
    one block's activations during its recomputation

Only one role runs a forward with gradients at a time (the generator's exit
step, or the critic), so the peak adds the larger of the two.
"""
import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.nn as nn

GB = 1024**3


@dataclass
class RoleMemory:
    name: str
    params: int                 # all parameters of the role
    trainable: int              # optimised parameters (LoRA: adapters)
    weight_bytes: float
    grad_bytes: float
    optim_bytes: float
    gather_bytes: float = 0.0
    activation_bytes: float = 0.0
    notes: List[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return (self.weight_bytes + self.grad_bytes + self.optim_bytes
                + self.gather_bytes)


@dataclass
class MemoryPlan:
    gpus: int
    zero_stage: int
    dtype_bytes: int
    roles: List[RoleMemory]
    activation_bytes: float
    tokens: int

    @property
    def static_bytes(self) -> float:
        return sum(r.total for r in self.roles)

    @property
    def peak_bytes(self) -> float:
        return self.static_bytes + self.activation_bytes

    def table(self) -> str:
        rows = [f'{"role":<14}{"params":>10}{"trained":>10}{"weights":>10}{"grads":>9}'
                f'{"optim":>9}{"gather":>9}{"total":>9}  (GiB per GPU)']
        for r in self.roles:
            rows.append(f'{r.name:<14}{_count(r.params):>10}{_count(r.trainable):>10}'
                        f'{r.weight_bytes / GB:>10.1f}{r.grad_bytes / GB:>9.1f}'
                        f'{r.optim_bytes / GB:>9.1f}{r.gather_bytes / GB:>9.1f}'
                        f'{r.total / GB:>9.1f}  {"; ".join(r.notes)}')
        rows.append(f'{"activations":<14}{"":>67}{self.activation_bytes / GB:>9.1f}'
                    f'  ({self.tokens} tokens, estimate)')
        rows.append(f'{"peak":<14}{"":>67}{self.peak_bytes / GB:>9.1f}'
                    f'  ZeRO-{self.zero_stage}, {self.gpus} GPUs, '
                    f'{self.dtype_bytes}-byte weights')
        return '\n'.join(rows)


def _count(n: int) -> str:
    for unit, div in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if n >= div:
            return f'{n / div:.2f}{unit}'
    return str(n)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(math.prod(p.shape) for p in module.parameters()
               if not trainable_only or p.requires_grad)


def _score_cfg(cfg: dict) -> dict:
    cfg = copy.deepcopy(dict(cfg))
    cfg.pop('pretrained', None)
    cfg['device'] = 'meta'
    return cfg


def build_roles_on_meta(model_cfg: dict) -> Dict[str, nn.Module]:
    """The distiller's role modules as the config builds them, on 'meta'
    (pretrained files are not read), with LoRA applied where configured."""
    import vdot_ext.models  # noqa: F401  (registers)
    from vdot_ext.registry import MODELS
    if 'real_score' not in model_cfg:
        raise KeyError('plan_memory: model.real_score is missing (a VDOTDistiller config)')
    real = model_cfg['real_score']
    roles = dict(
        real_score=MODELS.build(_score_cfg(real)),
        generator=MODELS.build(_score_cfg(model_cfg.get('generator') or real)),
        fake_score=MODELS.build(_score_cfg(model_cfg.get('fake_score') or real)))
    disc = model_cfg.get('discriminator')
    if disc:
        disc = dict(disc)
        disc.setdefault('model_dim', roles['fake_score'].dim)
        disc.setdefault('model_depth', roles['fake_score'].num_layers)
        roles['discriminator'] = MODELS.build(disc).to('meta')
    for name in ('generator', 'fake_score'):
        lora = model_cfg.get(f'{name}_lora')
        if lora:
            MODELS.build(dict(lora))(roles[name])
    return roles


def _block_params(score) -> int:
    return count_parameters(score.dit.blocks[0])


def activation_bytes(score, batch: int, frames: int, height: int, width: int,
                     text_len: int, dtype_bytes: int, checkpointing: bool) -> (float, int):
    """Estimate of the activations a forward with gradients keeps (see module doc)."""
    arch = score.arch
    f_lat = (frames - 1) // 4 + 1
    pf, ph, pw = arch['patch_size']
    tokens = (f_lat // pf) * (height // 8 // ph) * (width // 8 // pw)
    d, d_ff = arch['dim'], arch['ffn_dim']
    blocks = arch['num_layers'] + (len(arch['vace_layers']) if arch['vace_layers'] else 0)
    per_block = batch * dtype_bytes * (tokens * (10 * d + 2 * d_ff) + 2 * text_len * d)
    if checkpointing:
        total = blocks * batch * dtype_bytes * tokens * d + per_block
    else:
        total = blocks * per_block
    return float(total), tokens


def plan(cfg, gpus: int, frames: Optional[int] = None, height: Optional[int] = None,
         width: Optional[int] = None, text_len: int = 512, batch: Optional[int] = None,
         zero_stage: Optional[int] = None, dtype_bytes: Optional[int] = None,
         roles: Optional[Dict[str, nn.Module]] = None) -> MemoryPlan:
    """Memory plan of a config (an mmengine Config or dict)."""
    if gpus < 1:
        raise ValueError(f'plan_memory: --gpus must be >= 1, got {gpus}')
    model_cfg = cfg['model']
    strategy = cfg.get('strategy') or {}
    ds = dict(strategy.get('config') or {})
    stage = zero_stage if zero_stage is not None else int(
        (ds.get('zero_optimization') or {}).get('stage', 0))
    if dtype_bytes is None:
        half = (ds.get('bf16') or {}).get('enabled') or (ds.get('fp16') or {}).get('enabled')
        dtype_bytes = 2 if half else 4
    loader = cfg.get('train_dataloader') or {}
    dataset = loader.get('dataset') or {}
    frames = frames or dataset.get('num_frames') or 81
    height = height or dataset.get('height') or 480
    width = width or dataset.get('width') or 832
    batch = batch or loader.get('batch_size') or 1
    roles = roles or build_roles_on_meta(model_cfg)
    n, b = gpus, dtype_bytes
    master = 4 if b == 2 else 0   # fp32 master weights with bf16/fp16 training
    zero = ds.get('zero_optimization') or {}
    # ZeRO-Offload: fp32 master weights and Adam states live in CPU memory
    offload_optim = (zero.get('offload_optimizer') or {}).get('device') in ('cpu', 'nvme')

    def trainable_role(name, modules):
        total = sum(count_parameters(m) for m in modules)
        train = sum(sum(math.prod(p.shape) for n_, p in m.named_parameters()
                        if '.lora_' in n_) if getattr(m, '_vdot_lora_config', None)
                    else count_parameters(m) for m in modules)
        frozen = total - train
        w = b * train / (n if stage >= 3 else 1) + b * frozen / (n if stage >= 3 else 1)
        g = b * train / (n if stage >= 2 else 1)
        o = (8 + master) * train / (n if stage >= 1 else 1)
        notes = ['LoRA'] if frozen else []
        if offload_optim:
            notes.append(f'optimizer on CPU: {o / GB:.1f} GiB per rank')
            o = 0.0
        gather = 2 * b * _block_params(modules[0]) if stage >= 3 else 0.0
        return RoleMemory(name, total, train, w, g, o, gather, notes=notes)

    critic_modules = [roles['fake_score']] + ([roles['discriminator']]
                                              if 'discriminator' in roles else [])
    out = [trainable_role('generator', [roles['generator']]),
           trainable_role('critic', critic_modules)]
    teacher = roles['real_score']
    p_t = count_parameters(teacher)
    out.append(RoleMemory('real_score', p_t, 0, b * p_t / (n if stage >= 3 else 1), 0.0, 0.0,
                          2 * b * _block_params(teacher) if stage >= 3 else 0.0,
                          notes=['frozen']))
    ckpt = bool(model_cfg['real_score'].get('gradient_checkpointing', False))
    act, tokens = activation_bytes(roles['generator'], batch, frames, height, width,
                                   text_len, b, ckpt)
    return MemoryPlan(n, stage, b, out, act, tokens)


def main(argv=None):
    from mmengine.config import Config
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('--gpus', type=int, required=True)
    parser.add_argument('--zero-stage', type=int, default=None,
                        help='override the config\'s ZeRO stage')
    parser.add_argument('--frames', type=int, default=None)
    parser.add_argument('--height', type=int, default=None)
    parser.add_argument('--width', type=int, default=None)
    parser.add_argument('--text-len', type=int, default=512)
    parser.add_argument('--gpu-memory-gib', type=float, default=None,
                        help='say whether the peak fits this much memory per GPU')
    args = parser.parse_args(argv)
    cfg = Config.fromfile(args.config)
    result = plan(cfg, args.gpus, args.frames, args.height, args.width, args.text_len,
                  zero_stage=args.zero_stage)
    print(f'{args.config}:')
    print(result.table())
    if args.gpu_memory_gib:
        fits = result.peak_bytes / GB <= args.gpu_memory_gib
        print(f'fits {args.gpu_memory_gib:g} GiB per GPU: {"yes" if fits else "NO"}')
    return result


if __name__ == '__main__':
    main()
