"""One optimizer wrapper per trainable role (generator, critic)."""
from typing import Dict, Optional

import torch.nn as nn
from mmengine.optim import OptimWrapperDict

from vdot_ext.registry import (OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS,
                               OPTIMIZERS)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside mmengine/DDP wrappers (they keep it in ``.module``)."""
    while hasattr(model, 'module') and not hasattr(model, 'role_param_groups'):
        model = model.module
    return model


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class RoleOptimWrapperConstructor:
    """Builds an ``OptimWrapperDict`` with one ``OptimWrapper`` per role.

    The model says which parameters belong to a role through
    ``model.role_param_groups(role) -> list[dict(name=..., params=[...])]``.
    Config::

        optim_wrapper = dict(
            constructor='RoleOptimWrapperConstructor',
            generator=dict(type='OptimWrapper',
                           optimizer=dict(type='AdamW', lr=1e-6, betas=(0.0, 0.999))),
            critic=dict(type='OptimWrapper',
                        optimizer=dict(type='AdamW', lr=4e-7, betas=(0.0, 0.999)),
                        lr_mult=dict(discriminator=1.0)))

    ``lr_mult`` scales the learning rate of named parameter groups.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        if paramwise_cfg:
            raise ValueError('RoleOptimWrapperConstructor does not take '
                             'paramwise_cfg; use lr_mult inside a role entry')
        if not optim_wrapper_cfg:
            raise ValueError('optim_wrapper needs one entry per trainable role, '
                             'e.g. generator=dict(...), critic=dict(...)')
        self.optim_wrapper_cfg = optim_wrapper_cfg

    def __call__(self, model: nn.Module) -> OptimWrapperDict:
        model = unwrap_model(model)
        roles = set(model.trainable_roles())
        given = set(self.optim_wrapper_cfg)
        if given != roles:
            raise ValueError(
                f'optim_wrapper has entries {sorted(given)} but the model '
                f'{type(model).__name__} trains the roles {sorted(roles)}: give '
                'exactly one entry per role')
        wrappers: Dict[str, object] = {}
        for role, cfg in self.optim_wrapper_cfg.items():
            cfg = dict(cfg)
            if 'optimizer' not in cfg:
                raise ValueError(f'optim_wrapper.{role}.optimizer is missing')
            optimizer_cfg = dict(cfg.pop('optimizer'))
            lr_mult = dict(cfg.pop('lr_mult', {}) or {})
            base_lr = optimizer_cfg.get('lr')
            groups = []
            for group in model.role_param_groups(role):
                params = [p for p in group['params'] if p.requires_grad]
                if not params:
                    continue
                entry = dict(params=params, name=group['name'])
                if group['name'] in lr_mult:
                    if base_lr is None:
                        raise ValueError(f'optim_wrapper.{role}.lr_mult needs '
                                         f'optim_wrapper.{role}.optimizer.lr')
                    entry['lr'] = base_lr * lr_mult.pop(group['name'])
                groups.append(entry)
            if lr_mult:
                raise ValueError(f'optim_wrapper.{role}.lr_mult names unknown '
                                 f'parameter groups {sorted(lr_mult)}')
            if not groups:
                raise ValueError(f'role {role!r} has no trainable parameters')
            optimizer_cfg['params'] = groups
            optimizer = OPTIMIZERS.build(optimizer_cfg)
            cfg.setdefault('type', 'OptimWrapper')
            cfg['optimizer'] = optimizer
            wrappers[role] = OPTIM_WRAPPERS.build(cfg)
        return OptimWrapperDict(**wrappers)
