"""Run a multi-stage recipe (teacher pretraining, stage 1, stage 2, evaluation)
from one config, one mmengine Runner per training stage (docs/DESIGN.md §7, §11).

A staged config has, besides the runtime settings shared by all stages
(``default_scope``, ``env_cfg``, ``default_hooks``, ``log_processor`` ...)::

    stage_order = ['codecs', 'teacher', 'stage1', 'stage2', 'evaluate']
    stages = dict(
        codecs=dict(call=dict(type='prepare_tiny_codecs', ...)),   # a FUNCTIONS entry
        teacher=dict(runner=dict(model=..., train_dataloader=..., train_cfg=...,
                                 optim_wrapper=...)),              # a Runner config
        ...)

A stage may also set ``torch_num_threads`` (its intra-op threads, restored
after it; not hashed: it changes how the stage runs, not what it computes).

Each stage works in ``<work_dir>/<stage>``. The string ``{work_dir}`` anywhere in
a stage's config is replaced by the recipe's work dir, which is how a stage
names an earlier stage's output (``'{work_dir}/stage1/final_model.pth'``).

**Before any stage runs** every stage is validated: its structure, every
``dict(type=...)`` (a registered type, keywords its constructor takes) and
every ``'???'`` value; a config without ``strategy`` launched on several
processes is refused (``config_checks``).

**Markers.** A stage's *resolved config* is its config after ``{work_dir}``
substitution; for a training stage, merged with the common runtime settings
(the top-level keys mmengine's Runner reads). Stored and hashed with the work
dir written back as ``{work_dir}``, so a work dir may be moved or copied.
A finished stage writes ``stage_done.json``: the resolved config, its
``stable_hash``, a run id, the run ids of the earlier stages it consumed
(``upstream``) and the stage's result. A started stage writes
``stage_started.json`` (the same, without result) first.

On a rerun a stage is

* skipped when its marker's hash and upstream run ids match;
* resumed from its latest valid checkpoint when it was interrupted under the
  same config (``resolve_resume_checkpoint``);
* refused, before any stage runs, when its config changed (the message lists
  the differing keys as dotted paths) or an earlier stage was rerun since it
  finished, unless ``force_rerun`` names it or ``rerun_changed`` is set.

Rerunning a stage also reruns every later stage of ``stage_order``: the driver
does not know which later stage reads which output, and each may read any
earlier one. The outputs being replaced are moved to
``<work_dir>/replaced/<time>/<stage>`` (never deleted).

**Processes.** Every process plans the same way from the same files, then
rank 0 alone writes markers, final weights and the outputs of ``call``
stages; the others wait at a barrier. Training stages run on every process;
a ``call`` stage (codec preparation, evaluation: single-process functions)
runs on rank 0 and the others read its result from its marker.
"""
import contextlib
import copy
import datetime
import json
import os
import os.path as osp
import shutil
import time
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.logging import MMLogger, print_log

from vdot_ext.registry import FUNCTIONS
from vdot_ext.utils import is_main_process, merge_dicts, save_torch, stable_hash, unwrap_model, write_json

from .config_checks import (
    ConfigCheckError,
    check_build_specs,
    check_distributed_launch,
    find_required_fields,
    raise_problems,
)

DONE_FILE = 'stage_done.json'
STARTED_FILE = 'stage_started.json'
FINAL_WEIGHTS = 'final_model.pth'
REPLACED_DIR = 'replaced'
_STAGE_KINDS = ('runner', 'call')
# what else a stage may set: how it runs, not what it computes (not hashed)
_STAGE_SETTINGS = ('torch_num_threads', )
WORK_DIR_TOKEN = '{work_dir}'
# top-level keys that mmengine's Runner / FlexibleRunner read: a training
# stage's resolved config is its runner dict merged with these
RUNTIME_KEYS = (
    'model', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg', 'test_cfg',
    'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator', 'test_evaluator', 'default_hooks',
    'custom_hooks', 'data_preprocessor', 'load_from', 'env_cfg', 'log_processor', 'log_level', 'visualizer',
    'default_scope', 'randomness', 'strategy', 'compile', 'model_wrapper_cfg')
# settings that change how a run reports or where it runs, not what it
# computes: not part of the hash, so changing them never invalidates a stage
NOT_HASHED = ('log_level', 'log_processor', 'default_hooks.logger', 'default_hooks.timer')


class StageConflictError(ConfigCheckError):
    """Finished (or interrupted) stages whose outputs do not belong to this config."""


# ---------------------------------------------------------------------------
# resolving stage configs
# ---------------------------------------------------------------------------
def substitute(obj: Any, old: str, new: str) -> Any:
    """``old`` replaced by ``new`` in every string of a nested config (the
    ``{work_dir}`` placeholder and back)."""
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {k: substitute(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(substitute(v, old, new) for v in obj)
    return obj


def _plain(obj: Any) -> Any:
    if isinstance(obj, (Config, ConfigDict)):
        return obj.to_dict()
    return copy.deepcopy(obj)


def _json_plain(obj: Any) -> Any:
    """``obj`` as JSON sees it (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _drop(cfg: dict, dotted: str) -> None:
    *parents, last = dotted.split('.')
    node = cfg
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def validate_stages(cfg: Config) -> List[str]:
    """Check ``stages``/``stage_order``; return the order. Errors name the field."""
    stages = cfg.get('stages')
    order = cfg.get('stage_order')
    name = cfg.filename or 'config'
    if not isinstance(stages, dict) or not stages:
        raise ConfigCheckError(f'{name}: field "stages" must be a non-empty dict '
                               'of stage name -> dict(runner=...) or dict(call=...)')
    if order is None:
        order = list(stages)
    unknown = [stage for stage in order if stage not in stages]
    if unknown:
        raise ConfigCheckError(f'{name}: stage_order names {unknown}, which are not '
                               f'in "stages" (known: {sorted(stages)})')
    for stage_name in order:
        stage = stages[stage_name]
        where = f'{name}: stages.{stage_name}'
        kinds = [k for k in _STAGE_KINDS if k in stage]
        if len(kinds) != 1:
            raise ConfigCheckError(f'{where} must have exactly one of '
                                   f'{_STAGE_KINDS}, found {sorted(stage)}')
        unknown = sorted(set(stage) - set(_STAGE_KINDS) - set(_STAGE_SETTINGS))
        if unknown:
            raise ConfigCheckError(f'{where}: unknown key(s) {unknown}; a stage holds {kinds[0]!r} and '
                                   f'optionally {list(_STAGE_SETTINGS)}')
        threads = stage.get('torch_num_threads')
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigCheckError(f'{where}.torch_num_threads: expected a positive int (this stage\'s '
                                   f'intra-op threads, instead of the top-level torch_num_threads), got {threads!r}')
        if 'runner' in stage:
            for key in ('model', 'train_dataloader', 'train_cfg', 'optim_wrapper'):
                if key not in stage['runner']:
                    raise ConfigCheckError(f'{where}.runner.{key} is missing')
        elif 'type' not in stage['call']:
            raise ConfigCheckError(f'{where}.call.type is missing '
                                   '(a function registered in vdot_ext.registry.FUNCTIONS)')
    return list(order)


class _Stage:
    """One stage of a recipe, resolved against a work dir."""

    def __init__(self, name: str, cfg: Config, common: dict, work_dir: str):
        self.name = name
        self.dir = osp.join(work_dir, name)
        stage = substitute(_plain(cfg.stages[name]), WORK_DIR_TOKEN, work_dir)
        self.kind = 'call' if 'call' in stage else 'runner'
        self.own = stage[self.kind]                     # the stage's own dict, substituted
        self.num_threads = stage.get('torch_num_threads')   # None: the process's setting
        if self.kind == 'runner':
            # the config the Runner gets: every common key, then the stage's
            self.run_cfg = merge_dicts(common, self.own)
            hashed = {k: v for k, v in self.run_cfg.items() if k in RUNTIME_KEYS or k in self.own}
        else:
            self.run_cfg = dict(self.own)
            hashed = dict(call=self.own, default_scope=common.get('default_scope'))
        hashed = _json_plain(substitute(hashed, work_dir, WORK_DIR_TOKEN))
        for key in NOT_HASHED:
            _drop(hashed, key)
        self.resolved = hashed
        self.config_hash = stable_hash(hashed)

    def path_of(self, key: str) -> str:
        """The dotted path a user writes for ``key`` of the resolved config:
        under ``stages.<name>.<kind>`` when the stage's own dict has it, else
        top-level (a common runtime setting)."""
        parts = key.split('.')
        if self.kind == 'call':
            return f'stages.{self.name}.{key}' if parts[0] == 'call' else key
        node = self.own
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                return key
            node = node[part]
        return f'stages.{self.name}.runner.{key}'


def check_stages(cfg: Config, work_dir: str = '/work_dir', launcher: Optional[str] = None) -> List[str]:
    """Validate every stage before any runs; return the stage order.

    Structure (:func:`validate_stages`), every required ``'???'`` value,
    every ``dict(type=...)`` (registered; keywords its constructor takes) and,
    for distributed launches, a ``strategy`` in each training stage. All
    problems are reported at once, each with its dotted path
    (``stages.<name>.runner.model.<path>``). Raises :class:`ConfigCheckError`.
    """
    order = validate_stages(cfg)
    filename = cfg.filename or 'config'
    common = _common(cfg)
    required, problems = [], []
    for name in order:
        stage = _Stage(name, cfg, common, work_dir)
        prefix = f'stages.{name}.{stage.kind}'
        required += find_required_fields(stage.own, prefix)
        implicit = ('work_dir', ) if stage.kind == 'call' else ()
        hint = 'FUNCTIONS' if stage.kind == 'call' else None
        problems += check_build_specs(stage.own, prefix, hint=hint, implicit=implicit)
        if stage.kind == 'runner' and launcher is not None:
            check_distributed_launch(stage.run_cfg, launcher, f'{filename}: {prefix}')
    runtime = {k: v for k, v in common.items() if k in RUNTIME_KEYS}
    required += find_required_fields(runtime)
    problems += check_build_specs(runtime)
    if required:
        lines = '\n'.join(f'  {path}: {what}' for path, what in required)
        raise ConfigCheckError(f'{filename}: required field(s) not set:\n{lines}\n'
                               'set them in the config or with --cfg-options KEY=VALUE')
    raise_problems(sorted(set(problems), key=problems.index), filename,
                   'build specs that would fail when the stage starts')
    return order


def _common(cfg: Config) -> dict:
    return {k: v for k, v in cfg.to_dict().items()
            if k not in ('stages', 'stage_order', 'work_dir', 'launcher')}


# ---------------------------------------------------------------------------
# markers
# ---------------------------------------------------------------------------
def _read_json(path: str) -> Optional[dict]:
    if not osp.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise StageConflictError(f'{path}: unreadable stage marker ({exc}); delete it to rerun '
                                     'that stage') from exc


def config_diff(old: Any, new: Any, prefix: str = '') -> List[Tuple[str, str]]:
    """Dotted paths where two resolved configs differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            path = f'{prefix}.{key}' if prefix else str(key)
            if key not in old:
                lines.append((path, f'(absent) -> {_short(new[key])}'))
            elif key not in new:
                lines.append((path, f'{_short(old[key])} -> (absent)'))
            else:
                lines += config_diff(old[key], new[key], path)
        return lines
    if old != new:
        return [(prefix, f'{_short(old)} -> {_short(new)}')]
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _has_checkpoints(stage_dir: str) -> bool:
    if not osp.isdir(stage_dir):
        return False
    return any(n == 'last_checkpoint' or n.startswith(('iter_', 'epoch_')) for n in os.listdir(stage_dir))


# ---------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------
_PENDING = 'pending'  # the run id of a stage that runs now: every recorded id differs from it


def _plan(stages: List[_Stage], selected: List[str], force_rerun: Iterable[str],
          rerun_changed: bool) -> Dict[str, Any]:
    """Decide, from the markers on disk, what happens to each stage:
    ``skip`` (finished under this config), ``run`` (new), ``resume``
    (interrupted under this config), ``rerun`` (outputs moved aside first) or
    ``not selected``. Returns ``dict(actions, markers, conflicts)``."""
    force = set(force_rerun)
    actions: Dict[str, str] = {}
    markers: Dict[str, Optional[dict]] = {}
    conflicts: List[str] = []
    run_ids: Dict[str, Optional[str]] = {}
    cascade = None            # the first rerun stage: every later stage reruns
    last_selected = max(i for i, s in enumerate(stages) if s.name in selected)
    for index, stage in enumerate(stages):
        done = _read_json(osp.join(stage.dir, DONE_FILE))
        started = _read_json(osp.join(stage.dir, STARTED_FILE))
        markers[stage.name] = done
        upstream = {s.name: run_ids[s.name] for s in stages[:index]}
        is_selected = stage.name in selected
        reason = None
        if done is not None:
            reason = _why_stale(stage, done, upstream, 'finished')
            action = 'skip' if reason is None else 'rerun'
        elif started is not None:
            reason = _why_stale(stage, started, upstream, 'was interrupted')
            action = 'resume' if reason is None else 'rerun'
        elif stage.kind == 'runner' and _has_checkpoints(stage.dir):
            reason = (f'stage "{stage.name}" has checkpoints in {stage.dir} but no record of the config '
                      f'they were trained with (no {STARTED_FILE}: written by vdot_ext before config hashing)')
            action = 'rerun'
        else:
            action = 'run'
        if not is_selected:
            if cascade is not None and index < last_selected:
                conflicts.append(f'stage "{stage.name}" consumes the outputs of "{cascade}", which reruns now, '
                                 'and feeds later selected stages: add it to --stages')
            elif reason is not None and index < last_selected:
                conflicts.append(reason)     # later selected stages would consume stale outputs
            action = 'not selected'
        elif cascade is not None or stage.name in force:
            action = 'rerun' if (done or started or osp.isdir(stage.dir)) else 'run'
            cascade = cascade or stage.name
        elif reason is not None:
            if not rerun_changed:
                conflicts.append(reason)
            cascade = stage.name
        actions[stage.name] = action
        run_ids[stage.name] = (done or {}).get('run_id') if action in ('skip', 'not selected') else _PENDING
    return dict(actions=actions, markers=markers, conflicts=conflicts)


def _why_stale(stage: _Stage, marker: dict, upstream: dict, state: str) -> Optional[str]:
    where = f'stage "{stage.name}" ({osp.join(stage.dir, DONE_FILE if state == "finished" else STARTED_FILE)})'
    if 'config_hash' not in marker:
        return (f'{where} {state} without a record of its config (written by vdot_ext before config '
                'hashing), so its outputs cannot be checked against this config')
    if marker['config_hash'] != stage.config_hash:
        diff = config_diff(marker.get('config', {}), stage.resolved)
        lines = '\n'.join(f'    {stage.path_of(path)}: {change}' for path, change in diff[:20])
        more = f'\n    ... {len(diff) - 20} more' if len(diff) > 20 else ''
        return f'{where} {state} with another config; differing keys (recorded -> now):\n{lines}{more}'
    recorded = marker.get('upstream', {})
    changed = [name for name, run_id in upstream.items() if recorded.get(name) != run_id]
    if changed:
        return (f'{where} {state} on outputs of earlier stage(s) {changed} that run again now or were '
                'rerun since')
    return None


def _conflict_message(plan: dict, order: List[str], work_dir: str, filename: str) -> str:
    first = next((n for n in order if plan['actions'][n] == 'rerun'), order[0])
    later = order[order.index(first) + 1:]
    return (f'{filename}: the work dir {work_dir} holds results that do not belong to this config:\n'
            + '\n'.join(f'  {c}' for c in plan['conflicts'])
            + '\nNothing was run. Either\n'
            '  * run this config in its own work dir (--work-dir DIR), or\n'
            f'  * rerun: --force-rerun {first} (or --rerun-changed, which reruns every changed stage). '
            'A rerun stage also reruns every stage after it in stage_order, since they consume its outputs'
            + (f' (here: {", ".join(later)})' if later else '')
            + f'; the outputs they replace are moved to {osp.join(work_dir, REPLACED_DIR)}/<time>/.')


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------
def run_stages(cfg: Config, work_dir: str, only: Optional[List[str]] = None,
               force_rerun: Iterable[str] = (), rerun_changed: bool = False) -> dict:
    """Run the stages of ``cfg`` in order in ``work_dir``; returns each stage's result.

    Args:
        only: run only these stages (in config order); the others' outputs
            on disk are used as they are.
        force_rerun: rerun these stages, and every later one, even when
            finished; their previous outputs are moved aside.
        rerun_changed: rerun every stage whose config changed (and every
            later one) instead of refusing.

    ``cfg.launcher`` (set by ``tools/train.py``) says how the processes were
    launched. Raises :class:`ConfigCheckError` (or its subclass
    :class:`StageConflictError`) before any stage runs.
    """
    filename = cfg.filename or 'config'
    launcher = cfg.get('launcher', 'none') or 'none'
    work_dir = osp.abspath(work_dir)
    order = check_stages(cfg, work_dir, launcher)
    force_rerun = list(force_rerun or ())
    for flag, names in (('--stages', only or ()), ('--force-rerun', force_rerun)):
        missing = [s for s in names if s not in order]
        if missing:
            raise ConfigCheckError(f'{flag} {missing}: not in stage_order {order}')
    selected = [s for s in order if s in only] if only else list(order)
    outside = [s for s in force_rerun if s not in selected]
    if outside:
        raise ConfigCheckError(f'--force-rerun {outside}: not among the stages to run ({selected})')

    common = _common(cfg)
    _init_distributed(launcher, common.get('env_cfg', {}).get('dist_cfg', {}))
    stages = [_Stage(name, cfg, common, work_dir) for name in order]
    # rank 0 reads the markers; every rank acts on its plan
    plan = None
    if is_main_process():
        try:
            plan = _plan(stages, selected, force_rerun, rerun_changed)
        except StageConflictError as exc:
            plan = dict(error=str(exc))
    plan = _from_main(plan)
    if 'error' in plan:
        raise StageConflictError(plan['error'])
    if plan['conflicts']:
        raise StageConflictError(_conflict_message(plan, order, work_dir, filename))

    if is_main_process():
        os.makedirs(work_dir, exist_ok=True)
    logger = MMLogger.get_instance(f'vdot_stages_{time.time_ns()}',
                                   log_file=osp.join(work_dir, 'stages.log'), file_mode='a')
    replaced_root = osp.join(work_dir, REPLACED_DIR, time.strftime('%Y%m%d_%H%M%S'))
    outputs: Dict[str, dict] = {}
    run_ids: Dict[str, Optional[str]] = {}
    for index, stage in enumerate(stages):
        action = plan['actions'][stage.name]
        marker = plan['markers'][stage.name]
        if action in ('skip', 'not selected'):
            run_ids[stage.name] = (marker or {}).get('run_id')
            if action == 'skip':
                outputs[stage.name] = marker.get('result', {})
                logger.info(f'[stage {stage.name}] already done ({osp.join(stage.dir, DONE_FILE)}); skipping')
            continue
        started = None
        if is_main_process():
            if action == 'rerun' and osp.exists(stage.dir):
                target = osp.join(replaced_root, stage.name)
                os.makedirs(replaced_root, exist_ok=True)
                shutil.move(stage.dir, target)
                logger.info(f'[stage {stage.name}] rerun: previous outputs moved to {target}')
            if action == 'resume':
                started = _read_json(osp.join(stage.dir, STARTED_FILE))
            else:
                started = dict(stage=stage.name, run_id=uuid.uuid4().hex, config_hash=stage.config_hash,
                               upstream={s.name: run_ids[s.name] for s in stages[:index]},
                               started=time.strftime('%Y%m%d_%H%M%S'), config=stage.resolved)
                write_json(osp.join(stage.dir, STARTED_FILE), started)
        _wait_all()
        started = _from_main(started)
        start = time.time()
        logger.info(f'[stage {stage.name}] {"resuming" if action == "resume" else "starting"} in {stage.dir}')
        with _intra_op_threads(stage.num_threads, stage.name, logger):
            if stage.kind == 'call':
                result = None
                if is_main_process():   # single-process functions: rank 0 runs and writes
                    call = dict(stage.run_cfg)
                    call.setdefault('work_dir', stage.dir)
                    result = FUNCTIONS.build(call) or {}
            else:
                result = _run_training_stage(stage, started, launcher, resume=action == 'resume')
        if is_main_process():
            result = dict(result, seconds=round(time.time() - start, 1))
            write_json(osp.join(stage.dir, DONE_FILE),
                       dict(started, result=result, finished=time.strftime('%Y%m%d_%H%M%S')))
            os.remove(osp.join(stage.dir, STARTED_FILE))
            logger.info(f'[stage {stage.name}] done in {result["seconds"]} s: {result}')
        _wait_all()             # the next stage reads this one's outputs
        outputs[stage.name] = _from_main(result)
        run_ids[stage.name] = started['run_id']
    return outputs


@contextlib.contextmanager
def _intra_op_threads(count: Optional[int], name: str, logger) -> Iterator[None]:
    """``stages.<name>.torch_num_threads``: torch's intra-op thread count for one stage, restored after it
    (tiny models of one stage may be per-op bound while another stage's larger tensors use every core)."""
    if count is None:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    logger.info(f'[stage {name}] torch_num_threads={count} (was {before})')
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_training_stage(stage: _Stage, started: dict, launcher: str, resume: bool) -> dict:
    from .checkpointing import resolve_resume_checkpoint
    from .deepspeed_strategy import build_runner
    stage_cfg = Config(copy.deepcopy(stage.run_cfg))
    stage_cfg.work_dir = stage.dir
    stage_cfg.launcher = launcher
    # the same name on every rank: rank 0's start time
    stage_cfg.experiment_name = f'{stage.name}_{started["started"]}'
    stage_cfg.resume = False
    if resume:
        # an interrupted stage continues from its latest valid checkpoint
        checkpoint = resolve_resume_checkpoint(stage.dir)
        if checkpoint is not None:
            stage_cfg.resume = True
            stage_cfg.load_from = checkpoint
            print_log(f'[stage {stage.name}] resuming from {checkpoint}', logger='current')
    # FlexibleRunner + RoleDeepSpeedStrategy when the config has `strategy`
    runner = build_runner(stage_cfg)
    runner.train()
    strategy = getattr(runner, 'strategy', None)
    # every rank takes part in gathering ZeRO-3 shards; rank 0 writes
    state = (strategy.consolidated_state_dict()
             if hasattr(strategy, 'consolidated_state_dict') else unwrap_model(runner.model).state_dict())
    final = osp.join(stage.dir, FINAL_WEIGHTS)
    if is_main_process():
        save_torch({'state_dict': state,
                    'meta': dict(stage=stage.name, iter=runner.iter, config_hash=stage.config_hash)}, final)
        print_log(f'[stage {stage.name}] final weights: {final}', logger='current')
    return dict(final_weights=final, iterations=runner.iter)


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
# rank 0 may run a call stage (codec training, evaluation) for longer than
# NCCL's default collective timeout while the others wait
_WAIT_TIMEOUT = datetime.timedelta(hours=24)
_WAIT_GROUP: Dict[str, Any] = {}


def _init_distributed(launcher: str, dist_cfg: dict) -> None:
    """Start the process group before the first stage, so that ranks are
    known (only rank 0 writes) and the driver can wait at barriers.

    mmengine's Runner and ``RoleDeepSpeedStrategy`` reuse an existing group.
    On a machine without CUDA, NCCL is replaced by gloo (as the strategy does).
    """
    import torch
    import torch.distributed as torch_dist
    if launcher == 'none' or torch_dist.is_initialized():
        return
    dist_cfg = dict(dist_cfg or {})
    if not torch.cuda.is_available() and dist_cfg.get('backend', 'nccl') == 'nccl':
        print_log('stage driver: no CUDA device, using the gloo backend', logger='current')
        dist_cfg['backend'] = 'gloo'
    if launcher == 'pytorch' and not torch.cuda.is_available():
        # mmengine's init_dist('pytorch') calls torch.cuda.set_device
        timeout = dist_cfg.pop('timeout', None)
        kwargs = dict(timeout=datetime.timedelta(seconds=timeout)) if timeout else {}
        torch_dist.init_process_group(backend=dist_cfg['backend'], **kwargs)
    else:
        from mmengine.dist import init_dist
        init_dist(launcher, **dist_cfg)


def _wait_group():
    import torch.distributed as torch_dist
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return None
    if 'group' not in _WAIT_GROUP:
        _WAIT_GROUP['group'] = torch_dist.new_group(backend='gloo', timeout=_WAIT_TIMEOUT)
    return _WAIT_GROUP['group']


def _wait_all() -> None:
    """Barrier of every process of the recipe (nothing for one process), on a
    gloo group with a long timeout (``_WAIT_TIMEOUT``)."""
    import torch.distributed as torch_dist
    group = _wait_group()
    if group is not None:
        torch_dist.barrier(group=group)


def _from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the work dir need not be shared)."""
    import torch.distributed as torch_dist
    group = _wait_group()
    if group is None:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
