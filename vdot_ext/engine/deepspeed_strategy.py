"""DeepSpeed with one engine per trainable role (DESIGN.md §3, §7).

mmengine 0.10.7's ``DeepSpeedStrategy`` builds one engine with one optimizer,
drives it through its own ``train_step`` (so the model's ``train_step`` with
the Algorithm-1 schedule never runs) and imports
``deepspeed.runtime.fp16.onebit``, which DeepSpeed 0.19 removed. This module
does not import it. ``RoleDeepSpeedStrategy`` instead:

* builds the model, then one ``deepspeed.initialize`` engine per trainable
  role (``model.trainable_roles()``: ``generator``; ``critic`` = fake score +
  discriminator heads), each with its own optimizer, ZeRO stage, precision,
  gradient accumulation and clipping;
* partitions frozen roles (``model.frozen_roles()``: the teacher) with a
  ZeRO-3 engine that has no optimizer, or places/casts them (ZeRO 0-2);
* hands the model's own ``train_step`` an ``OptimWrapperDict`` of
  ``DeepSpeedRoleOptimWrapper`` (``update_params(loss)`` = engine backward +
  step), so the model's schedule is unchanged from the plain Runner path;
* saves and resumes every engine (weights, optimizer, ZeRO partitions), the
  model's remaining state (the ``iteration`` counter), the loop state, the
  param schedulers and each rank's RNG state (a resumed run draws the same
  noise as an uninterrupted one).

The modules stay where they are inside the model: the model calls
``self.generator(...)`` etc. directly, never an engine (a frozen role's
``.module`` is what other roles' steps see). ZeRO-3 gathers parameters through
module hooks, which fire on direct calls too.

Config::

    strategy = dict(
        type='RoleDeepSpeedStrategy',
        config=dict(zero_optimization=dict(stage=3), bf16=dict(enabled=True)),
        roles=dict(critic=dict(gradient_clipping=1.0)))   # per-role overrides
    optim_wrapper = dict(constructor='RoleOptimWrapperConstructor', ...)  # as usual

``clip_grad=dict(max_norm=...)`` and ``accumulative_counts`` of a role's
optim_wrapper entry become that engine's ``gradient_clipping`` and
``gradient_accumulation_steps`` unless the DeepSpeed dict sets them.
"""
import copy
import logging
import os
import os.path as osp
import socket
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from mmengine._strategy.base import BaseStrategy
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper, OptimWrapperDict

from vdot_ext.registry import STRATEGIES

CHECKPOINT_STATE = 'vdot_state.pth'
RNG_FILE = 'rng_state_rank{rank}.pth'
LORA_FILE = 'lora_{role}.pth'


def _deepspeed():
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - dependency of the extra
        raise ImportError('RoleDeepSpeedStrategy needs deepspeed '
                          '(pip install deepspeed)') from err
    return deepspeed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def zero_stage(config: dict) -> int:
    return int((config.get('zero_optimization') or {}).get('stage', 0))


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its data lives in per-rank ``ds_tensor`` shards)."""
    return hasattr(param, 'ds_id')


@contextmanager
def gathered(params, modifier_rank: Optional[int] = None):
    """Full values of ZeRO-3 parameters inside the block (no-op otherwise)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    deepspeed = _deepspeed()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def module_state_dict(module: nn.Module, only_trainable: bool = False,
                      keys: Optional[set] = None) -> Dict[str, torch.Tensor]:
    """CPU state dict of ``module`` with ZeRO-3 parameters gathered (one
    parameter at a time, so peak memory is one full tensor)."""
    out = {}
    named = dict(module.named_parameters())
    for name, tensor in module.state_dict(keep_vars=True).items():
        if keys is not None and name not in keys:
            continue
        param = named.get(name)
        if only_trainable and (param is None or not getattr(param, '_vdot_trainable', False)):
            continue
        with gathered([tensor]):
            out[name] = tensor.detach().to('cpu', copy=True)
    return out


def register_bypassed_parameters(module: nn.Module) -> int:
    """ZeRO-3 gathers a module's own parameters in hooks around its
    ``__call__``. ``WanVACEScore`` runs each VACE block as
    ``DiTBlock.forward(block, ...)`` (bypassing the block's ``__call__``), so
    the block's direct parameters (``modulation``) are registered as external
    parameters of the score network, whose ``__call__`` does run. Returns the
    number registered."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    count = 0
    for owner in module.modules():
        vace = getattr(owner, 'vace', None)
        if vace is None or not hasattr(vace, 'vace_blocks'):
            continue
        for block in vace.vace_blocks:
            for param in block.parameters(recurse=False):
                register_external_parameter(owner, param)
                count += 1
    return count


class RoleModule(nn.Module):
    """The modules of one role under their names in the model, as one
    ``nn.Module`` for ``deepspeed.initialize`` (the modules are shared with
    the model, not copied)."""

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        self.roles = nn.ModuleDict(modules)

    def forward(self, *args, **kwargs):  # the model calls the modules itself
        raise RuntimeError('RoleModule is a parameter container; the model '
                           'calls its role modules directly')


class DeepSpeedRoleOptimWrapper(OptimWrapper):
    """One role's optimizer wrapper over a DeepSpeed engine.

    ``update_params(loss)``: ``engine.backward(loss)`` then ``engine.step()``
    (DeepSpeed applies gradient accumulation, clipping, loss scaling, ZeRO
    reduction and zeroes the gradients). ``optimizer`` is the torch optimizer
    DeepSpeed steps (its ``param_groups`` carry the learning rates that
    mmengine's param schedulers and loggers read and write).
    """

    def __init__(self, engine, optimizer: torch.optim.Optimizer, role: str):
        super().__init__(optimizer)
        self.engine = engine
        self.role = role

    # -- the model's interface --------------------------------------------
    @contextmanager
    def optim_context(self, model: nn.Module):
        # DeepSpeed's own forward clears the ZeRO backward bookkeeping at the
        # start of each micro step; the model calls its modules directly.
        engine = self.engine
        opt = engine.optimizer
        if hasattr(opt, 'clear_backward_seen_flag'):
            opt.clear_backward_seen_flag()
        buffer = getattr(opt, 'grad_partitions_flat_buffer', None)
        if buffer is not None and engine.micro_steps % engine.gradient_accumulation_steps() == 0:
            # ZeRO-3 keeps reduced gradients in one flat buffer and, for a
            # parameter that requires grad but gets none in this backward
            # (the discriminator during a fake-score step), re-uses the stale
            # slice of the previous window. Zero it when a window starts.
            buffer.zero_()
        yield

    def update_params(self, loss: torch.Tensor, step_kwargs=None, zero_kwargs=None) -> None:
        self.backward(loss)
        self.step()

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        from deepspeed.runtime.utils import register_output_backward_hooks
        engine = self.engine
        # engine.forward() registers the backward prologue (ZeRO bookkeeping,
        # accumulation boundary) on its outputs; the model computed the loss
        # from direct module calls, so it is registered on the loss, which is
        # the first tensor the backward pass reaches.
        register_output_backward_hooks(
            loss, preprocess_once_fn=engine._backward_prologue,
            preprocess_per_tensor_fn=engine._backward_prologue_per_tensor)
        engine.backward(loss)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is not None and self.message_hub is not None:
            self.message_hub.update_scalar(f'train/{self.role}_grad_norm', float(norm))

    def zero_grad(self, **kwargs) -> None:
        # DeepSpeed zeroes gradients itself after every optimizer step
        pass

    def initialize_count_status(self, model, init_counts, max_counts) -> None:
        self._inner_count = init_counts
        self._max_counts = max_counts

    # optimizer state lives in the engine's checkpoint
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _to_plain(obj):
    """ConfigDicts -> dicts (DeepSpeed's pydantic config wants plain types)."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj) if isinstance(obj, list) else [_to_plain(v) for v in obj]
    return obj


@STRATEGIES.register_module()
class RoleDeepSpeedStrategy(BaseStrategy):
    """DeepSpeed training of a model with several trainable roles.

    Args:
        config: DeepSpeed config dict shared by all roles (``zero_optimization``,
            ``bf16``/``fp16``, ``gradient_accumulation_steps``,
            ``gradient_clipping``, ...), or a path to a JSON file.
        roles: per-role overrides merged into ``config`` (e.g. a different
            ``gradient_clipping`` or ZeRO stage for the critic).
        frozen: config of the frozen roles' engines (merged into ``config``
            without optimizer keys); with ZeRO-3 they are partitioned like the
            trainable roles, otherwise placed on the device (and cast to
            bf16/fp16 when enabled).
        save_lora: also write each LoRA-adapted role's LoRA weights,
            gathered, to ``<checkpoint>/lora_<role>.pth`` (input of
            ``vdot_ext/tools/merge_lora.py``).
        exclude_frozen_parameters: leave parameters that are not optimised
            (LoRA base weights) out of the engine checkpoints; they are
            rebuilt from the config on resume.
    """

    def __init__(self,
                 *,
                 config: Union[dict, str, None] = None,
                 roles: Optional[Dict[str, dict]] = None,
                 frozen: Optional[dict] = None,
                 save_lora: bool = True,
                 exclude_frozen_parameters: bool = True,
                 steps_per_print: int = 10**12,
                 **kwargs):
        if isinstance(config, str):
            import json
            with open(config) as f:
                config = json.load(f)
        self.config = _to_plain(dict(config or {}))
        self.config['steps_per_print'] = steps_per_print
        self.role_overrides = _to_plain(dict(roles or {}))
        self.frozen_config = _to_plain(dict(frozen or {}))
        self.save_lora = save_lora
        self.exclude_frozen_parameters = exclude_frozen_parameters
        self.engines: Dict[str, object] = {}
        self.frozen_engines: Dict[str, object] = {}
        super().__init__(**kwargs)

    # ------------------------------------------------------------------
    # distributed setup: pytorch (torchrun) or none (one process)
    # ------------------------------------------------------------------
    def _setup_env(self, *, launcher: Optional[str] = None, dist_cfg: Optional[dict] = None, **kwargs):
        dist_cfg = dict(dist_cfg or {})
        if (launcher in (None, 'none')) and not torch_dist.is_initialized():
            # DeepSpeed needs a process group even for one process
            os.environ.setdefault('RANK', '0')
            os.environ.setdefault('LOCAL_RANK', '0')
            os.environ.setdefault('WORLD_SIZE', '1')
            os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
            os.environ.setdefault('MASTER_PORT', str(free_port()))
            self._init_process_group(**dist_cfg)
        super()._setup_env(launcher=launcher, dist_cfg=dist_cfg, **kwargs)

    def _setup_distributed(self, launcher=None, backend='nccl', **kwargs):
        if launcher in ('pytorch', 'none', None):
            self._init_process_group(backend=backend, **kwargs)
        else:
            from mmengine.dist import init_dist
            init_dist(launcher, self._backend(backend), init_backend='deepspeed', **kwargs)

    @staticmethod
    def _backend(backend: str) -> str:
        from deepspeed.accelerator import get_accelerator
        accel = get_accelerator()
        if backend == 'nccl' and accel.device_name() == 'cpu':
            # NCCL needs GPUs; DeepSpeed's CPU accelerator communicates with gloo
            print_log('RoleDeepSpeedStrategy: dist_cfg.backend="nccl" but DeepSpeed '
                      'runs on its CPU accelerator; using "gloo"',
                      logger='current', level=logging.WARNING)
            return 'gloo'
        return backend

    def _init_process_group(self, backend: str = 'nccl', **kwargs):
        deepspeed = _deepspeed()
        from deepspeed.accelerator import get_accelerator
        accel = get_accelerator()
        if accel.device_name() != 'cpu':
            accel.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        deepspeed.init_distributed(dist_backend=self._backend(backend), **kwargs)

    @property
    def device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator
        return torch.device(get_accelerator().current_device_name())

    # ------------------------------------------------------------------
    # engines
    # ------------------------------------------------------------------
    def role_config(self, role: str, wrapper: Optional[OptimWrapper] = None) -> dict:
        """The DeepSpeed dict of ``role``: shared config + role overrides +
        the optim_wrapper's clipping/accumulation + batch size."""
        cfg = _merge(self.config, self.role_overrides.get(role, {}))
        if wrapper is not None:
            clip = wrapper.clip_grad_kwargs or {}
            if 'gradient_clipping' not in cfg and clip:
                if getattr(wrapper, 'grad_name', 'grad_norm') != 'grad_norm' or 'max_norm' not in clip:
                    raise ValueError(f'optim_wrapper.{role}.clip_grad: DeepSpeed clips by '
                                     f'global norm only; give clip_grad=dict(max_norm=...)')
                cfg['gradient_clipping'] = float(clip['max_norm'])
            if 'gradient_accumulation_steps' not in cfg:
                cfg['gradient_accumulation_steps'] = int(wrapper._accumulative_counts)
        cfg.setdefault('gradient_accumulation_steps', 1)
        cfg['train_micro_batch_size_per_gpu'] = int(
            self.dispatch_kwargs.get('train_micro_batch_size_per_gpu', 1))
        cfg.pop('train_batch_size', None)
        # the optimizer is a torch optimizer built from the config (AdamW):
        # ZeRO accepts it with this flag
        cfg.setdefault('zero_allow_untested_optimizer', True)
        return cfg

    def frozen_role_config(self) -> dict:
        cfg = _merge(self.config, self.frozen_config)
        for key in ('optimizer', 'scheduler', 'gradient_clipping', 'zero_allow_untested_optimizer'):
            cfg.pop(key, None)
        cfg['train_micro_batch_size_per_gpu'] = int(
            self.dispatch_kwargs.get('train_micro_batch_size_per_gpu', 1))
        cfg.setdefault('gradient_accumulation_steps', 1)
        return cfg

    @staticmethod
    def _named_role_modules(model: nn.Module, modules: List[nn.Module]) -> Dict[str, nn.Module]:
        names = {id(m): n for n, m in model.named_children()}
        out = {}
        for module in modules:
            if id(module) not in names:
                raise ValueError(f'{type(model).__name__}.trainable_roles() returned a '
                                 f'{type(module).__name__} that is not a direct child of '
                                 'the model; RoleDeepSpeedStrategy needs role modules to be '
                                 'attributes of the model')
            out[names[id(module)]] = module
        return out

    def _sync_from_rank0(self, module: nn.Module):
        """Every rank starts from rank 0's values (random inits differ by
        rank with ``diff_rank_seed``)."""
        if get_dist_info()[1] == 1:
            return
        device = self.device
        for tensor in list(module.parameters()) + list(module.buffers()):
            if is_partitioned(tensor):
                continue
            buf = tensor.data.to(device)
            torch_dist.broadcast(buf, 0)
            if buf is not tensor.data:
                tensor.data.copy_(buf)

    def prepare(self, model, *, optim_wrapper=None, param_scheduler=None,
                compile=False, dispatch_kwargs=None):
        if self._prepared:
            return self._prepared_components()
        deepspeed = _deepspeed()
        if dispatch_kwargs is not None:
            self.dispatch_kwargs.update(dispatch_kwargs)
        model = self.build_model(model)
        if hasattr(model, 'init_weights'):
            model.init_weights()
        if not hasattr(model, 'trainable_roles'):
            raise TypeError(f'RoleDeepSpeedStrategy: {type(model).__name__} has no '
                            'trainable_roles(); the model must say which modules each '
                            'role owns')
        self._sync_from_rank0(model)
        device = self.device
        roles = model.trainable_roles()
        role_children = set()

        if optim_wrapper is not None:
            # one torch optimizer per role (RoleOptimWrapperConstructor)
            built = self.build_optim_wrapper(optim_wrapper, model)
            if not isinstance(built, OptimWrapperDict):
                raise TypeError('RoleDeepSpeedStrategy: optim_wrapper must give one entry '
                                "per role (constructor='RoleOptimWrapperConstructor')")
            wrappers = {}
            for role, wrapper in built.items():
                if role not in roles:
                    raise ValueError(f'optim_wrapper has a role {role!r} the model does not '
                                     f'train (roles: {sorted(roles)})')
                modules = self._named_role_modules(model, roles[role])
                role_children.update(modules)
                container = RoleModule(modules)
                optimizer = wrapper.optimizer
                optimised = {id(p) for g in optimizer.param_groups for p in g['params']}
                for p in container.parameters():
                    # what the engine optimises (LoRA: adapters only); marks
                    # what checkpoints keep
                    p._vdot_trainable = id(p) in optimised
                cfg = self.role_config(role, wrapper)
                if zero_stage(cfg) == 3:
                    register_bypassed_parameters(container)
                engine, *_ = deepspeed.initialize(model=container, optimizer=optimizer,
                                                  config=cfg, dist_init_required=False)
                self.engines[role] = engine
                wrappers[role] = DeepSpeedRoleOptimWrapper(engine, optimizer, role)
                self.logger.info(
                    f'RoleDeepSpeedStrategy: role {role!r} ({", ".join(modules)}) -> DeepSpeed '
                    f'engine, ZeRO-{zero_stage(cfg)}, '
                    f'{sum(p.numel() for p in optimised_params(optimizer))} optimised '
                    f'parameters (per rank before partitioning), gradient_accumulation_steps='
                    f'{cfg["gradient_accumulation_steps"]}, gradient_clipping='
                    f'{cfg.get("gradient_clipping", 0.0)}')
            self.optim_wrapper = OptimWrapperDict(**wrappers)

        # frozen roles: partitioned (ZeRO-3) or placed, never optimised
        frozen_cfg = self.frozen_role_config()
        for name, module in _frozen_roles(model).items():
            module.requires_grad_(False)
            role_children.add(name)
            if zero_stage(frozen_cfg) == 3:
                register_bypassed_parameters(module)
                engine, *_ = deepspeed.initialize(model=module, config=frozen_cfg,
                                                  dist_init_required=False)
                self.frozen_engines[name] = engine
            else:
                dtype = _precision(frozen_cfg)
                module.to(device=device, dtype=dtype) if dtype else module.to(device)
            module.eval()

        # everything else (losses, data preprocessor, buffers such as the
        # distiller's iteration counter) goes to the device as it is
        for name, child in model.named_children():
            if name not in role_children and not any(
                    child is m for ms in roles.values() for m in ms):
                child.to(device)
        for name, buf in list(model._buffers.items()):
            if buf is not None:
                model._buffers[name] = buf.to(device)
        self.model = model
        if param_scheduler is not None:
            self.param_schedulers = self.build_param_scheduler(param_scheduler, self.optim_wrapper)
        self._prepared = True
        return self._prepared_components()

    # ------------------------------------------------------------------
    # state of the model not held by any engine
    # ------------------------------------------------------------------
    def _loose_state_keys(self) -> List[str]:
        """State-dict keys of the model outside role/frozen modules (e.g. the
        distiller's ``iteration`` buffer, loss modules' state)."""
        owned = set(self.frozen_engines) | set(_frozen_roles(self.model))
        for engine in self.engines.values():
            owned |= set(engine.module.roles.keys())
        return [k for k in self.model.state_dict(keep_vars=True)
                if k.split('.', 1)[0] not in owned]

    def role_state_dict(self, role: str, only_trainable: bool = False) -> Dict[str, torch.Tensor]:
        """Full (gathered) state dict of a role's modules, keys as in the model."""
        engine = self.engines[role]
        sd = module_state_dict(engine.module.roles, only_trainable=only_trainable)
        return sd

    def consolidated_state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's full state dict with ZeRO-3 parameters gathered (on
        every rank; CPU tensors). What ``final_model.pth`` should hold."""
        return module_state_dict(self.model)

    # ------------------------------------------------------------------
    # checkpoints: a directory per checkpoint
    #   <ckpt>/<role>/...          DeepSpeed engine checkpoint of each role
    #   <ckpt>/vdot_state.pth      loop meta, message hub, schedulers, model rest
    #   <ckpt>/rng_state_rank*.pth RNG state of every rank
    #   <ckpt>/lora_<role>.pth     gathered LoRA weights (LoRA roles only)
    # ------------------------------------------------------------------
    def save_checkpoint(self, filename: str, *, save_optimizer: bool = True,
                        save_param_scheduler: bool = True, extra_ckpt: Optional[dict] = None,
                        callback: Optional[Callable] = None) -> None:
        import mmengine
        rank = get_dist_info()[0]
        extra_ckpt = dict(extra_ckpt or {})
        extra_ckpt.setdefault('meta', {})
        extra_ckpt['meta'].update(seed=self.seed, time=time.strftime('%Y%m%d_%H%M%S'),
                                  mmengine=mmengine.__version__,
                                  world_size=get_dist_info()[1],
                                  strategy=type(self).__name__)
        if save_param_scheduler and hasattr(self, 'param_schedulers'):
            extra_ckpt['param_schedulers'] = self.scheduler_state_dict()
        loose = self._loose_state_keys()
        sd = self.model.state_dict()
        extra_ckpt['state_dict'] = {k: sd[k].detach().cpu() for k in loose}
        if callback is not None:
            callback(extra_ckpt)
        os.makedirs(filename, exist_ok=True)
        for role, engine in self.engines.items():
            params = list(engine.module.parameters())
            flags = [p.requires_grad for p in params]
            # DeepSpeed excludes parameters by requires_grad; the model
            # switches requires_grad per step, so mark what is optimised
            for p in params:
                p.requires_grad_(bool(getattr(p, '_vdot_trainable', True)))
            try:
                engine.save_checkpoint(filename, tag=role, client_state={}, save_latest=False,
                                       exclude_frozen_parameters=self.exclude_frozen_parameters)
            finally:
                for p, flag in zip(params, flags):
                    p.requires_grad_(flag)
        if self.save_lora:
            from vdot_ext.models.lora import lora_state_dict, has_lora
            for role, engine in self.engines.items():
                for name, module in engine.module.roles.items():
                    if has_lora(module):
                        lora = lora_state_dict(module)  # gathered on every rank
                        if rank == 0:
                            torch.save(dict(state_dict=lora, module=name, role=role,
                                            lora_config=module._vdot_lora_config),
                                       osp.join(filename, f'lora_{name}.pth'))
        torch.save(_rng_state(), osp.join(filename, RNG_FILE.format(rank=rank)))
        if rank == 0:
            torch.save(extra_ckpt, osp.join(filename, CHECKPOINT_STATE))
        torch_dist.barrier()

    def _load(self, filename: str, load_optimizer: bool, callback=None) -> dict:
        if not osp.isdir(filename) or not osp.isfile(osp.join(filename, CHECKPOINT_STATE)):
            raise FileNotFoundError(
                f'RoleDeepSpeedStrategy: {filename!r} is not a checkpoint of this strategy '
                f'(a directory with {CHECKPOINT_STATE} and one folder per role)')
        for role, engine in self.engines.items():
            if not osp.isdir(osp.join(filename, role)):
                raise FileNotFoundError(f'RoleDeepSpeedStrategy: checkpoint {filename!r} has no '
                                        f'engine folder for role {role!r}')
            params = list(engine.module.parameters())
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(bool(getattr(p, '_vdot_trainable', True)))
            try:
                path, _ = engine.load_checkpoint(
                    filename, tag=role, load_optimizer_states=load_optimizer,
                    load_lr_scheduler_states=False,
                    load_module_strict=not self.exclude_frozen_parameters)
            finally:
                for p, flag in zip(params, flags):
                    p.requires_grad_(flag)
            if path is None:
                raise RuntimeError(f'RoleDeepSpeedStrategy: DeepSpeed could not load role '
                                   f'{role!r} from {filename!r}')
        checkpoint = torch.load(osp.join(filename, CHECKPOINT_STATE), map_location='cpu',
                                weights_only=False)
        loose = checkpoint.get('state_dict', {})
        if loose:
            missing = set(loose) - set(self.model.state_dict())
            if missing:
                raise KeyError(f'{filename}: model state {sorted(missing)[:5]} is not in the model')
            self.model.load_state_dict(loose, strict=False)
        if callback is not None:
            callback(checkpoint)
        return checkpoint

    def load_checkpoint(self, filename: str, *, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')], callback=None) -> dict:
        """Weights only: a checkpoint directory of this strategy, or a
        consolidated ``.pth`` state dict (e.g. another stage's
        ``final_model.pth``), copied into the (possibly partitioned) model."""
        self.logger.info(f'Load checkpoint from {filename}')
        if osp.isdir(filename):
            return self._load(filename, load_optimizer=False, callback=callback)
        from vdot_ext.models.weights import read_state_dict
        state = read_state_dict(filename, field='load_from')
        load_full_state_dict(self.model, state, strict=strict, source=filename)
        return dict(state_dict=state)

    def resume(self, filename: str, *, resume_optimizer: bool = True,
               resume_param_scheduler: bool = True, map_location='default',
               callback=None) -> dict:
        self.logger.info(f'Resume checkpoint from {filename}')
        checkpoint = self._load(filename, load_optimizer=resume_optimizer, callback=callback)
        if resume_param_scheduler and hasattr(self, 'param_schedulers') \
                and 'param_schedulers' in checkpoint:
            self.load_scheduler_state_dict(checkpoint.pop('param_schedulers'))
        rank, world = get_dist_info()
        saved_world = checkpoint['meta'].get('world_size')
        rng_file = osp.join(filename, RNG_FILE.format(rank=rank))
        if saved_world == world and osp.isfile(rng_file):
            _set_rng_state(torch.load(rng_file, map_location='cpu', weights_only=False))
        else:
            self.logger.warning(f'{filename}: saved with {saved_world} processes, resumed with '
                                f'{world}; RNG streams restart from the seed')
        return checkpoint


def _frozen_roles(model) -> Dict[str, nn.Module]:
    # a single-role model (FlowMatchingPretrainer) has no frozen roles
    return model.frozen_roles() if hasattr(model, 'frozen_roles') else {}


def optimised_params(optimizer):
    seen = set()
    for group in optimizer.param_groups:
        for p in group['params']:
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def _precision(cfg: dict) -> Optional[torch.dtype]:
    if (cfg.get('bf16') or {}).get('enabled'):
        return torch.bfloat16
    if (cfg.get('fp16') or {}).get('enabled'):
        return torch.float16
    return None


def load_full_state_dict(model: nn.Module, state: Dict[str, torch.Tensor],
                         strict: bool = False, source: str = 'state dict') -> None:
    """Copy a full state dict into a model whose parameters may be ZeRO-3
    partitioned (each parameter gathered, written by rank 0, re-partitioned)."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(f'{source}: missing keys {missing[:5]}, unexpected {unexpected[:5]}')
    for key, tensor in own.items():
        if key not in state:
            continue
        with gathered([tensor], modifier_rank=0):
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f'{source}: {key} has shape {tuple(state[key].shape)}, '
                                 f'the model {tuple(tensor.shape)}')
            with torch.no_grad():
                tensor.data.copy_(state[key].to(tensor.dtype))


def _rng_state() -> dict:
    import random

    import numpy as np
    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def build_runner(cfg):
    """``FlexibleRunner`` when the config has a ``strategy`` (DeepSpeed),
    else mmengine's plain ``Runner`` (CPU tests, single device)."""
    if cfg.get('strategy'):
        from mmengine.runner import FlexibleRunner
        import vdot_ext.engine  # noqa: F401  (registers the strategy)
        strategy = cfg.strategy
        if isinstance(strategy.get('type'), str) and '.' not in strategy['type'] \
                and strategy['type'] in STRATEGIES.module_dict:
            # FlexibleRunner builds the strategy before it sets the default
            # scope: name the scope so mmengine's root registry finds it
            strategy['type'] = f'vdot_ext.{strategy["type"]}'
        return FlexibleRunner.from_cfg(cfg)
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg)
