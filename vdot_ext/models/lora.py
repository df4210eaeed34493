"""LoRA students through peft (Hu et al. 2021, "LoRA: Low-Rank Adaptation").

``LoRAAdapter`` injects peft LoRA layers into a role's module in place (after
its pretrained weights and initialisers are loaded) and freezes the base
weights. A LoRA linear layer computes::

    y = W x + b + (α / r) · B A dropout(x)      A ∈ R^{r×in}, B ∈ R^{out×r}, B₀ = 0

so at injection the module's function is unchanged. Defaults follow
DiffSynth-Studio's Wan LoRA training (``lora_target_modules="q,k,v,o,ffn.0,
ffn.2"``, ``lora_alpha = lora_rank``). Merging gives the full weight
``W' = W + (α / r) · B A`` (``merge_lora_state_dict``; the CLI is
``vdot_ext/tools/merge_lora.py``).

Keys: peft renames an adapted layer's ``q.weight`` to ``q.base_layer.weight``
and adds ``q.lora_A.default.weight`` / ``q.lora_B.default.weight``. LoRA-only
checkpoints hold the ``lora_`` keys; ``merge_lora_state_dict`` maps them back
onto the original (un-adapted) key layout.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from vdot_ext.registry import MODELS

DEFAULT_TARGETS = ('q', 'k', 'v', 'o', 'ffn.0', 'ffn.2')
ADAPTER = 'default'
LORA_MARK = '.lora_'
BASE_MARK = '.base_layer.'


@dataclass
class LoRAReport:
    """What ``LoRAAdapter`` did: adapted layer names, trainable (LoRA) and
    frozen (base) parameter counts."""
    layers: List[str]
    trainable: int
    frozen: int


def has_lora(module: nn.Module) -> bool:
    return getattr(module, '_vdot_lora_config', None) is not None


def is_lora_key(key: str) -> bool:
    return LORA_MARK in key


@MODELS.register_module()
class LoRAAdapter:
    """Inject LoRA into a module (peft ``inject_adapter_in_model``).

    Args:
        rank: r.
        alpha: α (default r, so the scale α/r is 1 as in DiffSynth).
        dropout: dropout on the LoRA branch input.
        target_modules: module-name suffixes to adapt (peft matching: a name
            equal to the target or ending in ``'.' + target``).
        exclude_modules: names/suffixes never adapted.
        init_lora_weights: peft's init (True: Kaiming A, zero B).
    """

    def __init__(self,
                 rank: int = 32,
                 alpha: Optional[float] = None,
                 dropout: float = 0.0,
                 target_modules: Sequence[str] = DEFAULT_TARGETS,
                 exclude_modules: Optional[Sequence[str]] = None,
                 init_lora_weights=True):
        if int(rank) <= 0:
            raise ValueError(f'LoRAAdapter.rank must be > 0, got {rank}')
        if not target_modules:
            raise ValueError('LoRAAdapter.target_modules is empty')
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.dropout = float(dropout)
        self.target_modules = [str(t) for t in target_modules]
        self.exclude_modules = list(exclude_modules) if exclude_modules else None
        self.init_lora_weights = init_lora_weights

    def config(self) -> dict:
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                    target_modules=list(self.target_modules),
                    exclude_modules=self.exclude_modules)

    def __call__(self, module: nn.Module) -> LoRAReport:
        from peft import LoraConfig, inject_adapter_in_model
        if has_lora(module):
            raise ValueError(f'LoRAAdapter: {type(module).__name__} already has LoRA layers')
        linear_names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        matched = [n for n in linear_names if any(n == t or n.endswith('.' + t)
                                                   for t in self.target_modules)]
        if not matched:
            raise ValueError(
                f'LoRAAdapter: no nn.Linear of {type(module).__name__} matches '
                f'target_modules={self.target_modules} (linear layers are e.g. '
                f'{linear_names[:6]})')
        kwargs = dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                      target_modules=self.target_modules,
                      init_lora_weights=self.init_lora_weights, bias='none')
        if self.exclude_modules:
            kwargs['exclude_modules'] = self.exclude_modules
        inject_adapter_in_model(LoraConfig(**kwargs), module, adapter_name=ADAPTER)
        trainable = frozen = 0
        for name, param in module.named_parameters():
            is_lora = is_lora_key(name)
            param.requires_grad_(is_lora)
            if is_lora:
                trainable += param.numel()
            else:
                frozen += param.numel()
        module._vdot_lora_config = self.config()
        layers = sorted({n.rsplit(BASE_MARK, 1)[0] for n, _ in module.named_parameters()
                         if BASE_MARK in n})
        return LoRAReport(layers=layers, trainable=trainable, frozen=frozen)


def lora_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in module.named_parameters() if is_lora_key(n)]


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    """``module.requires_grad_(flag)`` that keeps LoRA base weights frozen.

    The distiller switches whole roles on and off every step; for a LoRA role
    only the adapters may ever require gradients (a full 14B gradient would
    otherwise be computed and never used)."""
    if not has_lora(module):
        module.requires_grad_(flag)
        return
    for name, param in module.named_parameters():
        param.requires_grad_(flag and is_lora_key(name))


def lora_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The LoRA weights of ``module`` (ZeRO-3 shards gathered), CPU tensors."""
    from vdot_ext.engine.deepspeed_strategy import gathered
    out = {}
    for name, param in module.named_parameters():
        if is_lora_key(name):
            with gathered([param]):
                out[name] = param.detach().to('cpu', copy=True)
    return out


def _lora_layers(lora_sd: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{layer: {'A': tensor, 'B': tensor}}`` from ``layer.lora_A.<adapter>.weight`` keys."""
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in lora_sd.items():
        if not is_lora_key(key):
            raise KeyError(f'{key!r} is not a LoRA key (expected "<layer>.lora_A.'
                           f'<adapter>.weight" or "<layer>.lora_B.<adapter>.weight")')
        layer, rest = key.split(LORA_MARK, 1)
        kind = rest.split('.', 1)[0]   # 'A' or 'B' (peft: lora_A / lora_B)
        if kind not in ('A', 'B') or not rest.endswith('.weight'):
            raise KeyError(f'{key!r}: unsupported LoRA parameter (only linear lora_A/lora_B)')
        layers.setdefault(layer, {})[kind] = value
    for layer, parts in layers.items():
        if set(parts) != {'A', 'B'}:
            raise KeyError(f'LoRA layer {layer!r} lacks lora_{({"A", "B"} - set(parts)).pop()}')
    return layers


def merge_lora_state_dict(base_sd: Dict[str, torch.Tensor],
                          lora_sd: Dict[str, torch.Tensor],
                          scale: float,
                          source: str = 'base weights') -> Dict[str, torch.Tensor]:
    """Full weights ``W' = W + scale · B A`` in the original key layout.

    ``base_sd`` may be un-adapted (``q.weight``) or peft-adapted
    (``q.base_layer.weight``, LoRA keys are then dropped); the result has the
    un-adapted names. Computed in float32, returned in the base dtype.
    """
    base = {}
    for key, value in base_sd.items():
        if is_lora_key(key):
            continue
        base[key.replace(BASE_MARK, '.')] = value
    merged = dict(base)
    for layer, parts in _lora_layers(lora_sd).items():
        key = f'{layer}.weight'
        if key not in base:
            raise KeyError(f'{source} have no {key!r} for the LoRA layer {layer!r} '
                           f'(e.g. base keys {sorted(base)[:4]})')
        w = base[key]
        delta = parts['B'].float() @ parts['A'].float()
        if tuple(delta.shape) != tuple(w.shape):
            raise ValueError(f'LoRA layer {layer!r}: B·A is {tuple(delta.shape)} but '
                             f'{source} {key!r} is {tuple(w.shape)}')
        merged[key] = (w.float() + scale * delta).to(w.dtype)
    return merged


def lora_scale(config: dict) -> float:
    """α / r of a saved ``lora_config``."""
    return float(config['alpha']) / float(config['rank'])


def merged_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The live module's weights with its LoRA merged (ZeRO-3 gathered),
    in the un-adapted key layout."""
    from vdot_ext.engine.deepspeed_strategy import module_state_dict
    if not has_lora(module):
        return module_state_dict(module)
    sd = module_state_dict(module)
    lora = {k: v for k, v in sd.items() if is_lora_key(k)}
    return merge_lora_state_dict(sd, lora, lora_scale(module._vdot_lora_config))
