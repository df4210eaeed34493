"""Exponential moving average of the generator, safe under ZeRO-3.

    θ_ema ← d · θ_ema + (1 − d) · θ        after every generator update

Under ZeRO-3 each rank keeps the EMA of only its own shard of every parameter
(``param.ds_tensor``), so the EMA costs 4·N/world bytes per rank instead of
4·N; a checkpoint gathers the shards into full tensors (a collective every
rank joins) and a resume cuts them again. Without partitioning the EMA is a
plain float32 copy. For a LoRA generator only the adapters are averaged (the
base weights never change).
"""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.hooks import Hook

from vdot_ext.registry import HOOKS

CHECKPOINT_KEY = 'generator_ema'


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local(param: torch.Tensor) -> torch.Tensor:
    """The values of ``param`` this rank holds (its ZeRO-3 shard, or all)."""
    return param.ds_tensor if hasattr(param, 'ds_tensor') else param.data


def _unwrap(model):
    while hasattr(model, 'module') and not hasattr(model, 'trainable_roles'):
        model = model.module
    return model


@HOOKS.register_module()
class GeneratorEMAHook(Hook):
    """EMA of ``model.<module>`` (default the generator).

    Args:
        decay: d.
        module: attribute of the model to average.
        start_iter: iterations before this copy the weights instead.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, decay: float = 0.999, module: str = 'generator', start_iter: int = 0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f'GeneratorEMAHook.decay must be in [0, 1], got {decay}')
        self.decay = float(decay)
        self.module_name = module
        self.start_iter = int(start_iter)
        self.names: List[str] = []
        self.params: List[nn.Parameter] = []
        self.shards: List[torch.Tensor] = []
        self._pending: Optional[Dict[str, torch.Tensor]] = None

    # ------------------------------------------------------------------
    def _bind(self, runner):
        from vdot_ext.models.lora import has_lora, is_lora_key
        module = getattr(_unwrap(runner.model), self.module_name)
        lora = has_lora(module)
        self.names, self.params = [], []
        for name, param in module.named_parameters():
            if lora and not is_lora_key(name):
                continue
            self.names.append(name)
            self.params.append(param)
        self.shards = [_local(p).detach().float().clone() for p in self.params]

    def before_train(self, runner) -> None:
        if not self.params:
            self._bind(runner)
        if self._pending is not None:
            self.load_full_state_dict(self._pending)
            self._pending = None

    @torch.no_grad()
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        model = _unwrap(runner.model)
        trace = getattr(model, 'schedule_trace', None)
        if trace and trace[-1].generator is None:
            return   # the generator did not step this iteration (TTUR)
        decay = 0.0 if runner.iter < self.start_iter else self.decay
        for shard, param in zip(self.shards, self.params):
            shard.mul_(decay).add_(_local(param).float(), alpha=1.0 - decay)

    # ------------------------------------------------------------------
    def _gather_full(self, param, shard) -> torch.Tensor:
        if not hasattr(param, 'ds_tensor'):
            return shard.detach().cpu().clone()
        rank, world = _world()
        device = param.ds_tensor.device
        parts = [torch.empty_like(shard, device=device) for _ in range(world)]
        dist.all_gather(parts, shard.to(device))
        flat = torch.cat(parts)[:param.ds_numel]
        return flat.view(param.ds_shape).cpu()

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The EMA as full float32 tensors (every rank must call it under ZeRO-3)."""
        return {n: self._gather_full(p, s) for n, p, s in zip(self.names, self.params, self.shards)}

    def load_full_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f'GeneratorEMAHook: checkpoint EMA lacks {missing[:5]}')
        rank, world = _world()
        for i, (name, param) in enumerate(zip(self.names, self.params)):
            full = state[name].float()
            if hasattr(param, 'ds_tensor'):
                size = param.ds_tensor.numel()
                flat = torch.zeros(size * world)
                flat[:full.numel()] = full.flatten()
                self.shards[i] = flat[rank * size:(rank + 1) * size].to(
                    param.ds_tensor.device).clone()
            else:
                self.shards[i] = full.to(param.device).clone()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.params:
            self._bind(runner)
        checkpoint[CHECKPOINT_KEY] = self.full_state_dict()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            return
        if self.params:
            self.load_full_state_dict(checkpoint[CHECKPOINT_KEY])
        else:   # plain Runner resumes before before_train binds the module
            self._pending = checkpoint[CHECKPOINT_KEY]
