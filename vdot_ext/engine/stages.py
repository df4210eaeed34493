"""Run a multi-stage recipe (teacher pretraining, stage 1, stage 2, evaluation)
from one config, one mmengine Runner per training stage.

A staged config has, besides the runtime settings shared by all stages
(``default_scope``, ``env_cfg``, ``default_hooks``, ``log_processor`` ...)::

    stage_order = ['codecs', 'teacher', 'stage1', 'stage2', 'evaluate']
    stages = dict(
        codecs=dict(call=dict(type='prepare_tiny_codecs', ...)),   # a FUNCTIONS entry
        teacher=dict(runner=dict(model=..., train_dataloader=..., train_cfg=...,
                                 optim_wrapper=...)),              # a Runner config
        ...)

Each stage works in ``<work_dir>/<stage>``. The string ``{work_dir}`` anywhere in
a stage's config is replaced by the recipe's work dir, which is how a stage
names an earlier stage's output (``'{work_dir}/stage1/final_model.pth'``).

Nothing is lost on a crash: a finished stage leaves ``stage_done.json`` and is
skipped on the next run; an interrupted training stage resumes from its last
checkpoint.
"""
import copy
import json
import os
import os.path as osp
import time
from typing import Any, List, Optional

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import MMLogger, print_log

from vdot_ext.registry import FUNCTIONS

from .deepspeed_strategy import build_runner

DONE_FILE = 'stage_done.json'
FINAL_WEIGHTS = 'final_model.pth'
_STAGE_KINDS = ('runner', 'call')


def _substitute(obj: Any, work_dir: str) -> Any:
    if isinstance(obj, str):
        return obj.replace('{work_dir}', work_dir)
    if isinstance(obj, dict):
        return type(obj)({k: _substitute(v, work_dir) for k, v in obj.items()}) \
            if not isinstance(obj, ConfigDict) else ConfigDict(
                {k: _substitute(v, work_dir) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_substitute(v, work_dir) for v in obj)
    return obj


def _merge(base: dict, override: dict) -> dict:
    """Recursive dict merge (override wins), like mmengine's config inheritance."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) \
                and not value.get('_delete_', False):
            out[key] = _merge(out[key], value)
        else:
            value = copy.deepcopy(value)
            if isinstance(value, dict):
                value.pop('_delete_', None)
            out[key] = value
    return out


def validate_stages(cfg: Config) -> List[str]:
    """Check ``stages``/``stage_order``; return the order. Errors name the field."""
    stages = cfg.get('stages')
    order = cfg.get('stage_order')
    name = cfg.filename or 'config'
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f'{name}: field "stages" must be a non-empty dict '
                         'of stage name -> dict(runner=...) or dict(call=...)')
    if order is None:
        order = list(stages)
    unknown = [stage for stage in order if stage not in stages]
    if unknown:
        raise ValueError(f'{name}: stage_order names {unknown}, which are not '
                         f'in "stages" (known: {sorted(stages)})')
    for stage_name in order:
        stage = stages[stage_name]
        where = f'{name}: stages.{stage_name}'
        kinds = [k for k in _STAGE_KINDS if k in stage]
        if len(kinds) != 1:
            raise ValueError(f'{where} must have exactly one of '
                             f'{_STAGE_KINDS}, found {sorted(stage)}')
        if 'runner' in stage:
            for key in ('model', 'train_dataloader', 'train_cfg', 'optim_wrapper'):
                if key not in stage['runner']:
                    raise ValueError(f'{where}.runner.{key} is missing')
        elif 'type' not in stage['call']:
            raise ValueError(f'{where}.call.type is missing '
                             '(a function registered in vdot_ext.registry.FUNCTIONS)')
    return list(order)


def run_stages(cfg: Config, work_dir: str, only: Optional[List[str]] = None) -> dict:
    """Run the stages of ``cfg`` in order in ``work_dir``; returns their outputs."""
    order = validate_stages(cfg)
    if only:
        missing = [s for s in only if s not in order]
        if missing:
            raise ValueError(f'--stages {missing}: not in stage_order {order}')
        order = [s for s in order if s in only]
    work_dir = osp.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    common = {k: v for k, v in cfg.to_dict().items()
              if k not in ('stages', 'stage_order', 'work_dir')}
    logger = MMLogger.get_instance(
        f"vdot_stages_{time.time_ns()}",
        log_file=osp.join(work_dir, 'stages.log'))
    outputs = {}
    for name in order:
        stage_dir = osp.join(work_dir, name)
        done = osp.join(stage_dir, DONE_FILE)
        if osp.isfile(done):
            with open(done) as f:
                outputs[name] = json.load(f)
            logger.info(f'[stage {name}] already done ({done}); skipping')
            continue
        os.makedirs(stage_dir, exist_ok=True)
        stage = _substitute(copy.deepcopy(cfg.stages[name]), work_dir)
        start = time.time()
        logger.info(f'[stage {name}] starting in {stage_dir}')
        if 'call' in stage:
            call = dict(stage['call'])
            call.setdefault('work_dir', stage_dir)
            result = FUNCTIONS.build(call) or {}
        else:
            result = _run_training_stage(name, common, stage['runner'], stage_dir)
        result = dict(result, seconds=round(time.time() - start, 1))
        with open(done + '.tmp', 'w') as f:
            json.dump(result, f, indent=2, default=str)
        os.replace(done + '.tmp', done)
        outputs[name] = result
        logger.info(f'[stage {name}] done in {result["seconds"]} s: {result}')
    return outputs


def _run_training_stage(name: str, common: dict, runner_cfg: dict, stage_dir: str) -> dict:
    stage_cfg = Config(_merge(common, runner_cfg))
    stage_cfg.work_dir = stage_dir
    stage_cfg.experiment_name = f'{name}_{time.strftime("%Y%m%d_%H%M%S")}'
    # an interrupted stage continues from its last checkpoint
    stage_cfg.resume = osp.isfile(osp.join(stage_dir, 'last_checkpoint'))
    # FlexibleRunner + RoleDeepSpeedStrategy when the config has `strategy`;
    # the final weights are then gathered from the ZeRO-3 shards
    runner = build_runner(stage_cfg)
    runner.train()
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    strategy = getattr(runner, 'strategy', None)
    state = (strategy.consolidated_state_dict()
             if hasattr(strategy, 'consolidated_state_dict') else model.state_dict())
    final = osp.join(stage_dir, FINAL_WEIGHTS)
    if runner.rank == 0:
        torch.save({'state_dict': state,
                    'meta': dict(stage=name, iter=runner.iter)}, final + '.tmp')
        os.replace(final + '.tmp', final)
    print_log(f'[stage {name}] final weights: {final}', logger='current')
    return dict(final_weights=final, iterations=runner.iter)
