"""One optimizer wrapper per trainable role (generator, critic), docs/DESIGN.md §7."""
import copy
import logging
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapperDict

from vdot_ext.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS
from vdot_ext.utils import unwrap_model


@contextmanager
def _quiet_current_logger():
    """mmengine's ``add_params`` logs one line per parameter (a warning for
    each frozen LoRA base weight: thousands at 14B); one summary line replaces them."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def role_modules(model: nn.Module, role: str) -> Dict[str, nn.Module]:
    """``{attribute name: module}`` of the modules ``model.trainable_roles()``
    gives ``role``; each must be a direct child of the model."""
    names = {id(m): n for n, m in model.named_children()}
    out = {}
    for module in model.trainable_roles()[role]:
        if id(module) not in names:
            raise ValueError(f'{type(model).__name__}.trainable_roles()[{role!r}] holds a '
                             f'{type(module).__name__} that is not a direct child of the model; the '
                             'role modules must be attributes of the model')
        out[names[id(module)]] = module
    return out


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class RoleOptimWrapperConstructor:
    """Builds an ``OptimWrapperDict`` with one ``OptimWrapper`` per role.

    Each role's parameter groups come from mmengine's
    ``DefaultOptimWrapperConstructor.add_params`` run over the role's modules
    (named as attributes of the model: ``generator.dit.blocks.0...``,
    ``discriminator.head...``), so ``paramwise_cfg`` (``custom_keys``,
    ``bias_decay_mult``, ``norm_decay_mult``, ...) works as in any mmengine
    config. Parameters that do not require gradients (LoRA base weights) stay
    out of the optimizer. Parameters with equal options are merged into one
    group per role part (``model.role_param_groups(role)``: e.g. ``fake_score``,
    ``discriminator``), so a DeepSpeed engine sees a few groups, not one per
    tensor. Config::

        optim_wrapper = dict(
            constructor='RoleOptimWrapperConstructor',
            paramwise_cfg=dict(norm_decay_mult=0.0),        # every role (optional)
            generator=dict(type='OptimWrapper',
                           optimizer=dict(type='AdamW', lr=1e-6, betas=(0.0, 0.999))),
            critic=dict(type='OptimWrapper',
                        optimizer=dict(type='AdamW', lr=4e-7, betas=(0.0, 0.999)),
                        paramwise_cfg=dict(custom_keys={'discriminator.': dict(lr_mult=2.0)}),
                        lr_mult=dict(discriminator=1.0)))

    A role's own ``paramwise_cfg`` replaces the shared one. ``lr_mult`` scales
    the learning rate of a named role part, on top of ``paramwise_cfg``.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        if not optim_wrapper_cfg:
            raise ValueError('optim_wrapper needs one entry per trainable role, '
                             'e.g. generator=dict(...), critic=dict(...)')
        self.optim_wrapper_cfg = optim_wrapper_cfg
        self.paramwise_cfg = dict(paramwise_cfg or {})

    def __call__(self, model: nn.Module) -> OptimWrapperDict:
        model = unwrap_model(model)
        roles = set(model.trainable_roles())
        given = set(self.optim_wrapper_cfg)
        if given != roles:
            raise ValueError(
                f'optim_wrapper has entries {sorted(given)} but the model '
                f'{type(model).__name__} trains the roles {sorted(roles)}: give '
                'exactly one entry per role')
        wrappers = {role: self.build_role(model, role, dict(cfg))
                    for role, cfg in self.optim_wrapper_cfg.items()}
        return OptimWrapperDict(**wrappers)

    def build_role(self, model: nn.Module, role: str, cfg: dict):
        if 'optimizer' not in cfg:
            raise ValueError(f'optim_wrapper.{role}.optimizer is missing')
        lr_mult = dict(cfg.pop('lr_mult', {}) or {})
        paramwise_cfg = dict(cfg.pop('paramwise_cfg', self.paramwise_cfg) or {})
        cfg.setdefault('type', 'OptimWrapper')
        default = DefaultOptimWrapperConstructor(copy.deepcopy(cfg), paramwise_cfg)
        groups = self._param_groups(model, role, default, lr_mult)
        optimizer_cfg = copy.deepcopy(default.optimizer_cfg)
        optimizer_cfg['params'] = groups
        wrapper_cfg = copy.deepcopy(default.optim_wrapper_cfg)
        wrapper_cfg['optimizer'] = OPTIMIZERS.build(optimizer_cfg)
        print_log(f'RoleOptimWrapperConstructor: role {role!r}: '
                  f'{sum(len(g["params"]) for g in groups)} trainable tensors in {len(groups)} parameter '
                  f'group(s): {[{k: v for k, v in g.items() if k != "params"} for g in groups]}',
                  logger='current')
        return OPTIM_WRAPPERS.build(wrapper_cfg)

    @staticmethod
    def _param_groups(model: nn.Module, role: str, default: DefaultOptimWrapperConstructor,
                      lr_mult: Dict[str, float]) -> List[dict]:
        part_of = {}
        for part in model.role_param_groups(role):
            part_of.update({id(p): part['name'] for p in part['params']})
        unknown = sorted(set(lr_mult) - set(part_of.values()))
        if unknown:
            raise ValueError(f'optim_wrapper.{role}.lr_mult names unknown parameter groups {unknown} '
                             f'(the role has {sorted(set(part_of.values()))})')
        per_param: List[dict] = []
        with _quiet_current_logger():
            # paramwise options per parameter; skips requires_grad=False
            default.add_params(per_param, nn.ModuleDict(role_modules(model, role)))
        merged: Dict[tuple, dict] = {}
        for entry in per_param:
            (param,) = entry['params']
            if id(param) not in part_of:
                raise ValueError(f'role {role!r}: a parameter of its modules is in no group of '
                                 f'{type(model).__name__}.role_param_groups({role!r})')
            options = {k: v for k, v in entry.items() if k != 'params'}
            name = part_of[id(param)]
            if name in lr_mult:
                if default.base_lr is None:
                    raise ValueError(f'optim_wrapper.{role}.lr_mult needs optim_wrapper.{role}.optimizer.lr')
                options['lr'] = options.get('lr', default.base_lr) * lr_mult[name]
            key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
            merged.setdefault(key, dict(options, name=name, params=[]))['params'].append(param)
        if not merged:
            raise ValueError(f'role {role!r} has no trainable parameters')
        return list(merged.values())
