"""DeepSpeed with one engine per trainable role (docs/DESIGN.md §3, §7).

mmengine 0.10.7's ``DeepSpeedStrategy`` builds one engine with one optimizer,
drives it through its own ``train_step`` (so the model's ``train_step`` with
the Algorithm-1 schedule never runs) and imports
``deepspeed.runtime.fp16.onebit``, which DeepSpeed 0.19 removed. This module
does not import it. ``RoleDeepSpeedStrategy.prepare`` instead runs named steps:

1. ``build_and_sync_model``: build, ``init_weights``, broadcast rank 0's values;
2. ``build_role_engines``: one ``deepspeed.initialize`` engine per trainable
   role (``model.trainable_roles()``: ``generator``; ``critic`` = fake score +
   discriminator heads), each with its own optimizer, ZeRO stage, precision,
   gradient accumulation and clipping, wrapped in a
   ``DeepSpeedRoleOptimWrapper`` (``deepspeed_optim_wrapper.py``), so the
   model's own ``train_step`` and schedule run unchanged;
3. ``place_frozen_roles``: the frozen roles (``model.frozen_roles()``: the
   teacher) partitioned by a ZeRO-3 engine without optimizer, or placed/cast
   (ZeRO 0-2);
4. ``move_the_rest``: losses, the data preprocessor and buffers (the
   distiller's iteration counter) to the device.

Checkpoints (``deepspeed_checkpoint.py``: layout, crash-safe publishing, safe
loading) hold every engine (weights, optimizer, ZeRO partitions), the model's
remaining state, the loop state, the param schedulers, each rank's RNG state
(a resumed run draws the same noise as an uninterrupted one) and, for LoRA
roles, the adapters in peft's layout.

The modules stay where they are inside the model: the model calls
``self.generator(...)`` etc. directly, never an engine (a frozen role's
``.module`` is what other roles' steps see). ZeRO-3 gathers parameters through
module hooks, which fire on direct calls too; parameters a model's forward
reaches around those hooks are declared by the model
(``_zero3_bypassed_modules``, ``vdot_ext.utils.zero``).

Config::

    strategy = dict(
        type='RoleDeepSpeedStrategy',
        config=dict(zero_optimization=dict(stage=3), bf16=dict(enabled=True)),
        roles=dict(critic=dict(gradient_clipping=1.0)))   # per-role overrides
    optim_wrapper = dict(constructor='RoleOptimWrapperConstructor', ...)  # as usual

``clip_grad=dict(max_norm=...)`` and ``accumulative_counts`` of a role's
optim_wrapper entry become that engine's ``gradient_clipping`` and
``gradient_accumulation_steps`` unless the DeepSpeed dict sets them; an
``accumulative_counts`` > 1 that the DeepSpeed dict contradicts is an error.
"""
import json
import logging
import os
import os.path as osp
import socket
import time
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from mmengine._strategy.base import BaseStrategy
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper, OptimWrapperDict

from vdot_ext.registry import STRATEGIES
from vdot_ext.utils import barrier, merge_dicts, set_rng_state
from vdot_ext.utils.zero import (
    gathered,
    gathered_state_dict,
    is_partitioned,
    load_full_state_dict,
    register_external_parameters,
)

from .deepspeed_checkpoint import (
    CHECKPOINT_STATE,
    LORA_DIR,
    RNG_FILE,
    load_rng_state,
    optimised_parameters_only,
    publish_folder,
    read_checkpoint_state,
    remove_path,
    save_rng_state,
    staging_folder,
    use_safe_checkpoint_engine,
    write_checkpoint_state,
)
from .deepspeed_optim_wrapper import DeepSpeedRoleOptimWrapper
from .optim import role_modules
from .runner_builder import build_runner

# re-exported: other modules import these names from here
__all__ = ['RoleDeepSpeedStrategy', 'DeepSpeedRoleOptimWrapper', 'RoleModule', 'build_runner',
           'gathered', 'is_partitioned', 'load_full_state_dict', 'zero_stage', 'CHECKPOINT_STATE',
           'RNG_FILE', 'read_checkpoint_state']


def _deepspeed():
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - dependency of the extra
        raise ImportError('RoleDeepSpeedStrategy needs deepspeed (pip install deepspeed)') from err
    return deepspeed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def zero_stage(config: dict) -> int:
    return int((config.get('zero_optimization') or {}).get('stage', 0))


def _precision(cfg: dict) -> Optional[torch.dtype]:
    if (cfg.get('bf16') or {}).get('enabled'):
        return torch.bfloat16
    if (cfg.get('fp16') or {}).get('enabled'):
        return torch.float16
    return None


def _to_plain(obj):
    """ConfigDicts -> dicts, tuples -> lists (DeepSpeed's pydantic config wants plain types)."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _frozen_roles(model) -> Dict[str, nn.Module]:
    # a single-role model (FlowMatchingPretrainer) has no frozen roles
    return model.frozen_roles() if hasattr(model, 'frozen_roles') else {}


def _optimised_params(optimizer):
    seen = set()
    for group in optimizer.param_groups:
        for p in group['params']:
            if id(p) not in seen:
                seen.add(id(p))
                yield p


class RoleModule(nn.Module):
    """The modules of one role under their names in the model, as one
    ``nn.Module`` for ``deepspeed.initialize`` (the modules are shared with
    the model, not copied)."""

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        self.roles = nn.ModuleDict(modules)

    def forward(self, *args, **kwargs):  # the model calls the modules itself
        raise RuntimeError('RoleModule is a parameter container; the model calls its role modules directly')


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
        save_lora: also write each LoRA-adapted module's adapters, gathered,
            to ``<checkpoint>/lora_<module>/`` (peft layout; input of
            ``vdot_ext/tools/merge_lora.py``, ``PeftModel.from_pretrained``
            and diffsynth's LoRA loader).
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
            try:
                with open(config) as f:
                    config = json.load(f)
            except (OSError, ValueError) as exc:
                raise ValueError(f'RoleDeepSpeedStrategy.config: cannot read the DeepSpeed JSON file '
                                 f'{config}: {exc}') from exc
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
        if backend == 'nccl' and get_accelerator().device_name() == 'cpu':
            # NCCL needs GPUs; DeepSpeed's CPU accelerator communicates with gloo
            print_log('RoleDeepSpeedStrategy: dist_cfg.backend="nccl" but DeepSpeed runs on its CPU '
                      'accelerator; using "gloo"', logger='current', level=logging.WARNING)
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
    # DeepSpeed configs
    # ------------------------------------------------------------------
    def role_config(self, role: str, wrapper: Optional[OptimWrapper] = None) -> dict:
        """The DeepSpeed dict of ``role``: shared config + role overrides +
        the optim_wrapper's clipping/accumulation + batch size."""
        cfg = merge_dicts(self.config, self.role_overrides.get(role, {}))
        if wrapper is not None:
            clip = wrapper.clip_grad_kwargs or {}
            if 'gradient_clipping' not in cfg and clip:
                if getattr(wrapper, 'grad_name', 'grad_norm') != 'grad_norm' or 'max_norm' not in clip:
                    raise ValueError(f'optim_wrapper.{role}.clip_grad: DeepSpeed clips by '
                                     f'global norm only; give clip_grad=dict(max_norm=...)')
                cfg['gradient_clipping'] = float(clip['max_norm'])
            counts = int(wrapper._accumulative_counts)
            given = cfg.get('gradient_accumulation_steps')
            if given is None:
                cfg['gradient_accumulation_steps'] = counts
            elif counts != 1 and int(given) != counts:
                # one of the two would be ignored without a word
                raise ValueError(f'RoleDeepSpeedStrategy: role {role!r}: optim_wrapper.{role}.accumulative_counts='
                                 f'{counts} but the DeepSpeed config sets gradient_accumulation_steps={given}; '
                                 'set one of them')
        cfg.setdefault('gradient_accumulation_steps', 1)
        cfg['train_micro_batch_size_per_gpu'] = int(
            self.dispatch_kwargs.get('train_micro_batch_size_per_gpu', 1))
        cfg.pop('train_batch_size', None)
        if (cfg.get('bf16') or {}).get('enabled') and cfg['bf16'].get('check_grad_overflow') is False:
            # a skipped non-finite step goes through DeepSpeed's overflow check
            raise ValueError(f'RoleDeepSpeedStrategy: role {role!r}: bf16.check_grad_overflow=False would let '
                             'non-finite gradients reach the weights under ZeRO-1/2; remove it')
        # the optimizer is a torch optimizer built from the config (AdamW):
        # ZeRO accepts it with this flag
        cfg.setdefault('zero_allow_untested_optimizer', True)
        return cfg

    def frozen_role_config(self) -> dict:
        cfg = merge_dicts(self.config, self.frozen_config)
        for key in ('optimizer', 'scheduler', 'gradient_clipping', 'zero_allow_untested_optimizer'):
            cfg.pop(key, None)
        cfg['train_micro_batch_size_per_gpu'] = int(
            self.dispatch_kwargs.get('train_micro_batch_size_per_gpu', 1))
        cfg.setdefault('gradient_accumulation_steps', 1)
        return cfg

    # ------------------------------------------------------------------
    # prepare: named steps
    # ------------------------------------------------------------------
    def prepare(self, model, *, optim_wrapper=None, param_scheduler=None,
                compile=False, dispatch_kwargs=None):
        if self._prepared:
            return self._prepared_components()
        if dispatch_kwargs is not None:
            self.dispatch_kwargs.update(dispatch_kwargs)
        model = self.build_and_sync_model(model)
        if optim_wrapper is not None:
            self.optim_wrapper = self.build_role_engines(model, optim_wrapper)
        self.place_frozen_roles(model)
        self.move_the_rest(model)
        self.model = model
        if param_scheduler is not None:
            self.param_schedulers = self.build_param_scheduler(param_scheduler, self.optim_wrapper)
        self._prepared = True
        return self._prepared_components()

    def build_and_sync_model(self, model) -> nn.Module:
        """Build the model, run its initialisers, start every rank from rank 0's
        values (random inits differ by rank with ``diff_rank_seed``)."""
        model = self.build_model(model)
        if hasattr(model, 'init_weights'):
            model.init_weights()
        if not hasattr(model, 'trainable_roles'):
            raise TypeError(f'RoleDeepSpeedStrategy: {type(model).__name__} has no trainable_roles(); the '
                            'model must say which modules each role owns')
        if get_dist_info()[1] > 1:
            device = self.device
            for tensor in list(model.parameters()) + list(model.buffers()):
                if is_partitioned(tensor):
                    continue
                buf = tensor.data.to(device)
                torch_dist.broadcast(buf, 0)
                if buf is not tensor.data:
                    tensor.data.copy_(buf)
        return model

    def build_role_engines(self, model: nn.Module, optim_wrapper) -> OptimWrapperDict:
        """One torch optimizer per role (``RoleOptimWrapperConstructor``), each
        handed to its own DeepSpeed engine."""
        built = self.build_optim_wrapper(optim_wrapper, model)
        if not isinstance(built, OptimWrapperDict):
            raise TypeError("RoleDeepSpeedStrategy: optim_wrapper must give one entry per role "
                            "(constructor='RoleOptimWrapperConstructor')")
        roles = model.trainable_roles()
        wrappers = {}
        for role, wrapper in built.items():
            if role not in roles:
                raise ValueError(f'optim_wrapper has a role {role!r} the model does not train '
                                 f'(roles: {sorted(roles)})')
            wrappers[role] = self.build_role_engine(model, role, wrapper)
        return OptimWrapperDict(**wrappers)

    def build_role_engine(self, model: nn.Module, role: str, wrapper: OptimWrapper) -> DeepSpeedRoleOptimWrapper:
        deepspeed = _deepspeed()
        modules = role_modules(model, role)
        container = RoleModule(modules)
        optimizer = wrapper.optimizer
        optimised = {id(p) for p in _optimised_params(optimizer)}
        for p in container.parameters():
            # what the engine optimises (LoRA: adapters only); what checkpoints keep
            p._vdot_trainable = id(p) in optimised
        cfg = self.role_config(role, wrapper)
        stage = zero_stage(cfg)
        if stage == 0:
            raise ValueError(f'RoleDeepSpeedStrategy: role {role!r} has zero_optimization.stage=0; use ZeRO '
                             'stage 1, 2 or 3 (a skipped non-finite step goes through the ZeRO optimizer)')
        if stage == 3:
            register_external_parameters(container)
        engine, *_ = deepspeed.initialize(model=container, optimizer=optimizer, config=cfg,
                                          dist_init_required=False)
        use_safe_checkpoint_engine(engine)
        self.engines[role] = engine
        self.logger.info(
            f'RoleDeepSpeedStrategy: role {role!r} ({", ".join(modules)}) -> DeepSpeed engine, ZeRO-{stage}, '
            f'{sum(p.numel() for p in _optimised_params(optimizer))} optimised parameters (per rank before '
            f'partitioning), gradient_accumulation_steps={cfg["gradient_accumulation_steps"]}, '
            f'gradient_clipping={cfg.get("gradient_clipping", 0.0)}')
        return DeepSpeedRoleOptimWrapper(engine, optimizer, role)

    def place_frozen_roles(self, model: nn.Module) -> None:
        """Frozen roles: partitioned by an optimizer-less ZeRO-3 engine, or
        placed on the device (cast to bf16/fp16 when enabled); never optimised."""
        frozen_cfg = self.frozen_role_config()
        for name, module in _frozen_roles(model).items():
            module.requires_grad_(False)
            if zero_stage(frozen_cfg) == 3:
                register_external_parameters(module)
                # never checkpointed: the frozen weights come from the config
                engine, *_ = _deepspeed().initialize(model=module, config=frozen_cfg, dist_init_required=False)
                self.frozen_engines[name] = engine
            else:
                dtype = _precision(frozen_cfg)
                module.to(device=self.device, dtype=dtype) if dtype else module.to(self.device)
            module.eval()

    def move_the_rest(self, model: nn.Module) -> None:
        """Everything else (losses, data preprocessor, buffers such as the
        distiller's iteration counter) to the device, as it is."""
        owned = self._role_owned_names(model)
        for name, child in model.named_children():
            if name not in owned:
                child.to(self.device)
        for name, buf in list(model._buffers.items()):
            if buf is not None:
                model._buffers[name] = buf.to(self.device)

    @staticmethod
    def _role_owned_names(model: nn.Module) -> set:
        """Attribute names of the modules owned by a trainable or frozen role."""
        owned_ids = {id(m) for ms in model.trainable_roles().values() for m in ms}
        owned_ids |= {id(m) for m in _frozen_roles(model).values()}
        return {name for name, child in model.named_children() if id(child) in owned_ids}

    # ------------------------------------------------------------------
    # state of the model
    # ------------------------------------------------------------------
    def _loose_state_keys(self) -> List[str]:
        """State-dict keys of the model outside role/frozen modules (e.g. the
        distiller's ``iteration`` buffer, loss modules' state)."""
        owned = self._role_owned_names(self.model)
        return [k for k in self.model.state_dict(keep_vars=True) if k.split('.', 1)[0] not in owned]

    def role_state_dict(self, role: str, only_trainable: bool = False) -> Dict[str, torch.Tensor]:
        """Full (gathered) state dict of a role's modules, keys as in the model."""
        include = (lambda _, t: bool(getattr(t, '_vdot_trainable', False))) if only_trainable else None
        return gathered_state_dict(self.engines[role].module.roles, include)

    def consolidated_state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's full state dict with ZeRO-3 parameters gathered (on
        every rank; CPU tensors). What ``final_model.pth`` should hold."""
        return gathered_state_dict(self.model)

    # ------------------------------------------------------------------
    # checkpoints: one folder each (deepspeed_checkpoint.py)
    # ------------------------------------------------------------------
    def save_checkpoint(self, filename: str, *, save_optimizer: bool = True,
                        save_param_scheduler: bool = True, extra_ckpt: Optional[dict] = None,
                        callback: Optional[Callable] = None) -> None:
        rank = get_dist_info()[0]
        checkpoint = self._checkpoint_dict(extra_ckpt, save_param_scheduler)
        if callback is not None:
            callback(checkpoint)
        staging = staging_folder(filename)
        if rank == 0:
            remove_path(staging)   # left by a killed save
            os.makedirs(staging)
        barrier()
        for role, engine in self.engines.items():
            with optimised_parameters_only(engine):
                engine.save_checkpoint(staging, tag=role, client_state={}, save_latest=False,
                                       exclude_frozen_parameters=self.exclude_frozen_parameters)
        if self.save_lora:
            self._save_lora_adapters(staging, rank)
        save_rng_state(staging, rank)
        if rank == 0:
            write_checkpoint_state(staging, checkpoint)
        barrier()
        if rank == 0:
            publish_folder(staging, filename)
        barrier()

    def _checkpoint_dict(self, extra_ckpt: Optional[dict], save_param_scheduler: bool) -> dict:
        import mmengine
        checkpoint = dict(extra_ckpt or {})
        checkpoint['meta'] = dict(checkpoint.get('meta') or {})
        checkpoint['meta'].update(seed=self.seed, time=time.strftime('%Y%m%d_%H%M%S'),
                                  mmengine=mmengine.__version__, world_size=get_dist_info()[1],
                                  strategy=type(self).__name__)
        if save_param_scheduler and hasattr(self, 'param_schedulers'):
            checkpoint['param_schedulers'] = self.scheduler_state_dict()
        state = self.model.state_dict()
        checkpoint['state_dict'] = {k: state[k].detach().cpu() for k in self._loose_state_keys()}
        return checkpoint

    def _save_lora_adapters(self, folder: str, rank: int) -> None:
        from vdot_ext.models.lora import has_lora, lora_state_dict, peft_config_dict, save_lora_adapter
        for role, engine in self.engines.items():
            for name, module in engine.module.roles.items():
                if has_lora(module):
                    adapters = lora_state_dict(module)   # a collective: every rank gathers
                    if rank == 0:
                        save_lora_adapter(osp.join(folder, LORA_DIR.format(module=name)), adapters,
                                          peft_config_dict(module), metadata=dict(module=name, role=role))

    def _load(self, filename: str, load_optimizer: bool, callback=None) -> dict:
        checkpoint = read_checkpoint_state(filename)   # checks it is a complete checkpoint
        for role, engine in self.engines.items():
            if not osp.isdir(osp.join(filename, role)):
                raise FileNotFoundError(f'RoleDeepSpeedStrategy: checkpoint {filename!r} has no engine folder '
                                        f'for role {role!r}')
            with optimised_parameters_only(engine):
                path, _ = engine.load_checkpoint(
                    filename, tag=role, load_optimizer_states=load_optimizer,
                    load_lr_scheduler_states=False, load_module_strict=not self.exclude_frozen_parameters)
            if path is None:
                raise RuntimeError(f'RoleDeepSpeedStrategy: DeepSpeed could not load role {role!r} from '
                                   f'{osp.join(filename, role)}')
        loose = checkpoint.get('state_dict', {})
        if loose:
            unknown = set(loose) - set(self.model.state_dict())
            if unknown:
                raise KeyError(f'{osp.join(filename, "state_dict.safetensors")}: model state '
                               f'{sorted(unknown)[:5]} is not in the model')
            self.model.load_state_dict(loose, strict=False)
        if callback is not None:
            callback(checkpoint)
        return checkpoint

    def load_checkpoint(self, filename: str, *, map_location='cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')], callback=None) -> dict:
        """Weights only: a checkpoint folder of this strategy, or a
        consolidated state-dict file (e.g. another stage's ``final_model.pth``),
        copied into the (possibly partitioned) model."""
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
        if resume_param_scheduler and hasattr(self, 'param_schedulers') and 'param_schedulers' in checkpoint:
            self.load_scheduler_state_dict(checkpoint.pop('param_schedulers'))
        rank, world = get_dist_info()
        saved_world = checkpoint['meta'].get('world_size')
        if saved_world == world:
            set_rng_state(load_rng_state(filename, rank))
        else:
            self.logger.warning(f'{filename}: saved with {saved_world} processes, resumed with {world}; RNG '
                                'streams restart from the seed')
        return checkpoint
