"""Exponential moving average of the generator, safe under ZeRO-3
(docs/DESIGN.md §7).

mmengine's ``ExponentialMovingAverage`` convention (``momentum`` m is the
weight of the *new* value; ``m = 1 − decay``)::

    θ_ema ← (1 − m) · θ_ema + m · θ        after every update of the module's role

and, as mmengine's ``AveragedModel`` does, the first update (and every update
before ``begin_iter``) copies θ. Under ZeRO-3 each rank keeps the EMA of only
its own shard of every parameter (``param.ds_tensor``), so the EMA costs
4·N/world bytes per rank instead of 4·N; a checkpoint gathers the shards into
full tensors (a collective every rank joins) and a resume cuts them again.
Without partitioning the EMA is a plain float32 copy. For a LoRA generator only
the adapters are averaged (the base weights never change).

Where the EMA goes:

* every checkpoint: ``ema_state_dict`` (mmengine's key) holds the averaged
  tensors under the module's own parameter names, and ``meta['ema']`` the
  module name, momentum and number of updates;
* the end of training: ``<work_dir>/ema_<module>.safetensors``;
* :func:`ema_generator_state_dict` reads either back for export or evaluation.
"""
import os.path as osp
import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.hooks import Hook

from vdot_ext.registry import HOOKS
from vdot_ext.utils import assert_finite_state_dict, is_main_process, load_tensor_file, save_safetensors, unwrap_model

CHECKPOINT_KEY = 'ema_state_dict'
LEGACY_CHECKPOINT_KEY = 'generator_ema'  # before mmengine's naming
META_KEY = 'ema'


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local(param: torch.Tensor) -> torch.Tensor:
    """The values of ``param`` this rank holds (its ZeRO-3 shard, or all)."""
    return param.ds_tensor if hasattr(param, 'ds_tensor') else param.data


def ema_file_name(module: str) -> str:
    return f'ema_{module}.safetensors'


@HOOKS.register_module()
class GeneratorEMAHook(Hook):
    """EMA of ``model.<module>`` (default the generator).

    Args:
        momentum: m, the weight of the new parameters in each update
            (mmengine's convention; ``momentum = 1 − decay``).
        module: attribute of the model to average.
        begin_iter: updates before iteration ``begin_iter`` (1-based count of
            finished iterations, as mmengine's ``EMAHook``) copy the weights.
        decay: deprecated; ``momentum = 1 − decay``.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, momentum: Optional[float] = None, module: str = 'generator', begin_iter: int = 0,
                 decay: Optional[float] = None):
        if decay is not None:
            if momentum is not None:
                raise ValueError('GeneratorEMAHook: give momentum (= 1 - decay), not both')
            warnings.warn('GeneratorEMAHook.decay is deprecated: use momentum = 1 - decay (mmengine\'s '
                          'convention)', DeprecationWarning, stacklevel=2)
            momentum = 1.0 - float(decay)
        momentum = 0.001 if momentum is None else float(momentum)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f'GeneratorEMAHook.momentum must be in (0, 1], got {momentum}')
        self.momentum = momentum
        self.module_name = module
        self.begin_iter = int(begin_iter)
        self.steps = 0
        self.names: List[str] = []
        self.params: List[nn.Parameter] = []
        self.shards: List[torch.Tensor] = []
        self._pending: Optional[dict] = None

    # ------------------------------------------------------------------
    def _bind(self, runner):
        from vdot_ext.models.lora import has_lora, is_lora_key
        module = getattr(unwrap_model(runner.model), self.module_name)
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
        # only a resume continues the checkpoint's EMA; load_from starts anew
        if self._pending is not None and runner.iter > 0:
            self.load_full_state_dict(self._pending['state'])
            self.steps = self._pending['steps']
        self._pending = None

    @torch.no_grad()
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        model = unwrap_model(runner.model)
        updated = getattr(model, 'updated_roles', None)
        if updated is not None and not any(self.module_name in model.role_modules(role) for role in updated):
            # the role did not change this iteration: TTUR, a skipped non-finite step, or a batch inside a
            # gradient-accumulation window (docs/DESIGN.md §7)
            return
        copy = self.steps == 0 or runner.iter + 1 < self.begin_iter
        for shard, param in zip(self.shards, self.params):
            if copy:
                shard.copy_(_local(param))
            else:   # mmengine ExponentialMovingAverage.avg_func
                shard.lerp_(_local(param).float(), self.momentum)
        self.steps += 1

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
            raise KeyError(f'GeneratorEMAHook: the checkpoint\'s {CHECKPOINT_KEY} lacks {missing[:5]} '
                           f'of model.{self.module_name}')
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

    def _meta(self) -> dict:
        return dict(module=self.module_name, momentum=self.momentum, steps=self.steps)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.params:
            self._bind(runner)
        checkpoint[CHECKPOINT_KEY] = self.full_state_dict()
        checkpoint.setdefault('meta', {})[META_KEY] = self._meta()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        key = CHECKPOINT_KEY if CHECKPOINT_KEY in checkpoint else LEGACY_CHECKPOINT_KEY
        if key not in checkpoint:
            self._pending = None
            return
        meta = (checkpoint.get('meta') or {}).get(META_KEY) or {}
        # a legacy checkpoint has no count: it had updated at least once
        self._pending = dict(state=checkpoint[key], steps=int(meta.get('steps', 1)))

    def after_train(self, runner) -> None:
        """Write ``ema_<module>.safetensors`` in the work dir (gathered on
        every rank, written by rank 0)."""
        state = self.full_state_dict()
        if is_main_process():
            save_safetensors(state, osp.join(runner.work_dir, ema_file_name(self.module_name)),
                             metadata=dict(self._meta(), iter=runner.iter))


def ema_generator_state_dict(checkpoint: str, base: Optional[str] = None,
                             module: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The EMA weights of ``module`` (default: the one the EMA was taken of,
    usually ``generator``), as that module's state dict, for export and
    evaluation: ``model.generator.load_state_dict(ema_generator_state_dict(p))``.

    ``checkpoint``: an mmengine checkpoint (``iter_*.pth``: its
    ``state_dict`` supplies the tensors the EMA does not cover, e.g. LoRA base
    weights), a DeepSpeed-strategy checkpoint directory, or the
    ``ema_<module>.safetensors`` written at the end of training. ``base``: a
    file with the model's full state dict (``final_model.pth``, model-level
    keys) to complete an EMA that covers part of the module; without one, and
    when ``checkpoint`` holds no full weights, only the averaged tensors are
    returned (for a full-parameter EMA, the whole module's parameters; for a
    LoRA generator, its adapters). Everything is loaded safely; non-finite
    values are an error naming the file.
    """
    weights: Dict[str, torch.Tensor] = {}
    if checkpoint.endswith('.safetensors'):
        from safetensors import safe_open
        ema = load_tensor_file(checkpoint, field='EMA weights')
        with safe_open(checkpoint, framework='pt') as f:
            saved_module = (f.metadata() or {}).get('module')
    else:
        from .checkpointing import read_checkpoint
        state = read_checkpoint(checkpoint)
        key = CHECKPOINT_KEY if CHECKPOINT_KEY in state else LEGACY_CHECKPOINT_KEY
        if key not in state:
            raise KeyError(f'{checkpoint}: no {CHECKPOINT_KEY!r} entry (the run had no GeneratorEMAHook)')
        ema = state[key]
        saved_module = ((state.get('meta') or {}).get(META_KEY) or {}).get('module')
        if not osp.isdir(checkpoint):  # a strategy folder's model weights live in the engine files
            weights = {k: v for k, v in (state.get('state_dict') or {}).items() if isinstance(v, torch.Tensor)}
    assert_finite_state_dict(ema, checkpoint, 'EMA weights')
    module = module or saved_module or 'generator'
    if saved_module and module != saved_module:
        raise ValueError(f'{checkpoint}: the EMA is of model.{saved_module}, not model.{module}')
    if base is not None:
        weights = load_tensor_file(base, field='EMA base')
    prefix = module + '.'
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if own:
        foreign = [k for k in ema if k not in own]
        if foreign:
            raise KeyError(f'{checkpoint}: EMA tensors {foreign[:5]} are not in model.{module} of '
                           f'{base or checkpoint}')
    own.update(ema)
    return own
