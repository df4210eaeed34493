"""Run ablation rows × seeds and tabulate them: the VDOT paper's Table 3 and Fig. 5 on the tiny recipe
(docs/DESIGN.md §12).

    python -m vdot_ext.tools.ablate --rows table3 --seeds 0 1 2 --work-root work_dirs/ablations --share-prefix

A row is a staged config, by name from ``configs/ablations/`` (``full``, ``no_otd``, ...; ``table3`` = the
paper's six rows, ``all`` = every row there) or by path. Each (row, seed) runs the stage driver
(``vdot_ext.engine.stages``) in its own work dir ``<root>/<row>/seed<k>``, seed-major (every row of seed 0
first), so an interrupted sweep has whole comparisons early. Rerunning the same command continues it:
finished stages are skipped by their markers, an interrupted training stage resumes from its checkpoint.

**Seeds.** Seed k sets, in each stage of ``--seed-stages`` (default: ``stage2``), ``randomness.seed = k``
and the model's ``seed`` (when its class takes one) for a training stage, ``seed = k`` for a call stage
whose function takes one. Evaluation noise is not seeded by k: every model is compared on the same held-out
VCUs from the same noise.

**Shared stages** (``--share-prefix``). A stage whose resolved config hash (the stage marker's) equals that
of a finished stage of another run under the root, and whose earlier stages are the very runs that one
consumed (the marker's ``upstream`` run ids), is linked (relative symlink; ``--share-mode copy`` copies)
into the run's work dir before the driver runs; the driver's markers then accept it as done. So codecs,
teacher and stage 1 run once for the whole sweep, and two rows whose configs resolve equal (``full`` and
the row naming the default option) share everything. The encoded-data folder ``data/`` is shared with the
codecs (its cache is keyed by the codec checkpoints' sha256).

**Outputs** under the root (atomic writes):

* ``ablation_table.md``: per row, mean ± sample std over seeds of each task metric of the student in
  ``<eval stage>/metrics.json``, n seeds; reference rows (teacher, real video); quality vs sampling steps;
* ``quality_vs_steps.png``: the student's task metrics at 1, 2, 4, 8 sampling steps (``--student-steps``)
  and the teacher's at 4 and 40 (``--teacher-steps``), computed here from each run's evaluated weights on
  the evaluation's held-out VCUs with noise seeded per sample (``validation_hook.sample_noise``); the
  teacher curve once per teacher checkpoint;
* ``quality_vs_iterations.png``: the task metrics over stage-2 training iterations from the stage's
  ``ValidationHook`` (``<train stage>/validation/iter_<k>/metrics.json``): the paper's Fig. 5;
* ``ablation_results.json``: every number above, per run.
"""
import argparse
import copy
import inspect
import json
import math
import os
import os.path as osp
import shutil
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

ROW_FOLDER = osp.join('configs', 'ablations')
# the paper's Table 3 rows, in its order, then the option rows of issue 11
TABLE3_ROWS = ('accwaninit_untrained', 'dmd_only', 'no_gan', 'no_otd', 'no_accwaninit', 'full')
OPTION_ROWS = ('weights_parity', 'weights_balanced', 'gan_critic_fake_score', 'gan_critic_heads')
TABLE_FILE = 'ablation_table.md'
RESULTS_FILE = 'ablation_results.json'
STEPS_PLOT = 'quality_vs_steps.png'
ITERATIONS_PLOT = 'quality_vs_iterations.png'
STEPS_FILE = 'quality_vs_steps.json'
TEACHER_CURVES = 'teacher_curves'
SHARED_EXTRAS = ('data', )
DONE_FILE = 'stage_done.json'   # vdot_ext.engine.stages.DONE_FILE, read here without importing torch


@dataclass
class Run:
    """One (row, seed) of the sweep."""
    row: str
    seed: int
    config_path: str
    work_dir: str
    label: str = ''
    cfg: object = None
    kept: List[str] = field(default_factory=list)
    status: str = 'pending'
    error: Optional[str] = None
    shared: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# rows and configs
# ---------------------------------------------------------------------------
def find_in_checkout(relative: str, want_dir: bool = False) -> Optional[str]:
    """``relative`` (a path from the repository root, e.g. ``configs/ablations``) in the source checkout, in the
    installed package's ``.mim`` copy or under the current directory: the first that exists, else None."""
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    exists = osp.isdir if want_dir else osp.isfile
    for path in (osp.join(osp.dirname(package), relative), osp.join(package, '.mim', relative),
                 osp.abspath(relative)):
        if exists(path):
            return path
    return None


def default_row_folder() -> Optional[str]:
    """``configs/ablations`` of the source checkout, of the installed package (``.mim``) or of the
    current directory, the first that exists."""
    return find_in_checkout(ROW_FOLDER, want_dir=True)


def available_rows(folder: str) -> List[str]:
    """Row names in ``folder`` (``*.py`` not starting with '_'): Table 3's first, then the option rows,
    then any other, sorted."""
    names = sorted(n[:-3] for n in os.listdir(folder) if n.endswith('.py') and not n.startswith('_'))
    known = [n for n in TABLE3_ROWS + OPTION_ROWS if n in names]
    return known + [n for n in names if n not in known]


def resolve_rows(rows: Sequence[str], folder: Optional[str]) -> List[tuple]:
    """``[(row name, config path)]`` for names, ``table3``, ``all`` or paths; unknown names are an
    error listing the rows there are."""
    resolved: List[tuple] = []
    for row in rows:
        if row.endswith('.py'):
            if not osp.isfile(row):
                raise ValueError(f'--rows {row}: no such config file')
            resolved.append((osp.splitext(osp.basename(row))[0], osp.abspath(row)))
            continue
        if folder is None:
            raise ValueError(f'--rows {row}: no {ROW_FOLDER} folder found; give --config-dir or a path')
        names = available_rows(folder)
        expanded = list(TABLE3_ROWS) if row == 'table3' else names if row == 'all' else [row]
        for name in expanded:
            path = osp.join(folder, f'{name}.py')
            if not osp.isfile(path):
                raise ValueError(f'--rows {name}: no {path}; rows in {folder}: {", ".join(names)}')
            resolved.append((name, path))
    unique = list(OrderedDict((name, path) for name, path in resolved).items())
    names = [name for name, _ in unique]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f'--rows: two configs named {clash}; rows are named by their file name')
    return unique


def _accepts(obj, keyword: str) -> bool:
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def apply_seed(cfg, seed: int, seed_stages: Sequence[str], filename: str) -> None:
    """Seed ``seed_stages`` of ``cfg`` in place (see the module docstring)."""
    from vdot_ext.engine.config_checks import ConfigCheckError
    from vdot_ext.registry import FUNCTIONS, MODELS
    randomness = dict(cfg.get('randomness') or {})
    for name in seed_stages:
        stage = cfg.stages.get(name)
        if stage is None:
            raise ConfigCheckError(f'{filename}: --seed-stages {name}: no stages.{name} (stages: '
                                   f'{sorted(cfg.stages)})')
        if 'runner' in stage:
            runner = stage['runner']
            # the seed overrides any seed the runner or the config sets (a keyword given twice would raise)
            runner['randomness'] = {**randomness, **dict(runner.get('randomness') or {}), 'seed': int(seed)}
            model = runner.get('model') or {}
            model_cls = MODELS.get(model.get('type')) if isinstance(model.get('type'), str) else model.get('type')
            if model_cls is not None and _accepts(model_cls, 'seed'):
                model['seed'] = int(seed)
        else:
            call = stage['call']
            function = FUNCTIONS.get(call['type']) if isinstance(call['type'], str) else call['type']
            if function is None or not _accepts(function, 'seed'):
                raise ConfigCheckError(f'{filename}: --seed-stages {name}: stages.{name}.call.type '
                                       f'{call["type"]!r} takes no seed')
            call['seed'] = int(seed)


def _get(cfg, dotted: str, filename: str):
    from vdot_ext.engine.config_checks import ConfigCheckError
    node = cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            raise ConfigCheckError(f'{filename}: ablation_fixed names {dotted!r}, which is not a key of the config')
        node = node[part]
    return copy.deepcopy(node)


def load_run_config(path: str, seed: int, seed_stages: Sequence[str], cfg_options: Optional[dict],
                    allow_new: bool = False):
    """The row's config with ``cfg_options`` merged (except the keys its ``ablation_fixed`` names) and the seed
    applied; returns ``(cfg, kept)``, ``kept`` the ``'key=value'`` of options not applied."""
    from mmengine.config import Config

    from vdot_ext.engine.config_checks import ConfigCheckError, check_cfg_options
    cfg = Config.fromfile(path)
    if 'stages' not in cfg:
        raise ConfigCheckError(f'{path}: not a staged config (no "stages"); an ablation row is a recipe')
    kept = []
    if cfg_options:
        check_cfg_options(cfg, cfg_options, allow_new=allow_new, filename=path)
        # what defines the row (e.g. row 1's 0 stage-2 iterations) survives options meant for every row
        fixed = {key: _get(cfg, key, path) for key in cfg.get('ablation_fixed', [])}
        cfg.merge_from_dict(cfg_options)
        for key, value in fixed.items():
            if _get(cfg, key, path) != value:
                kept.append(f'{key}={value!r}')
                cfg.merge_from_dict({key: value})
    apply_seed(cfg, seed, seed_stages, path)
    cfg.launcher = 'none'
    return cfg, kept


# ---------------------------------------------------------------------------
# shared stages
# ---------------------------------------------------------------------------
def _stages(cfg, work_dir: str):
    """The stage driver's resolved stages of ``cfg`` in ``work_dir`` (name → stage with ``config_hash``,
    ``run_cfg``), in order."""
    from vdot_ext.engine.stages import _common, _Stage, validate_stages
    common = _common(cfg)
    work_dir = osp.abspath(work_dir)
    return OrderedDict((name, _Stage(name, cfg, common, work_dir)) for name in validate_stages(cfg))


def _read_marker(stage_dir: str) -> Optional[dict]:
    path = osp.join(stage_dir, DONE_FILE)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_dirs(root: str) -> List[str]:
    """Every ``<root>/<row>/seed<k>`` folder."""
    found = []
    if not osp.isdir(root):
        return found
    for row in sorted(os.listdir(root)):
        row_dir = osp.join(root, row)
        if osp.isdir(row_dir) and not osp.islink(row_dir):
            found += [osp.join(row_dir, s) for s in sorted(os.listdir(row_dir))
                      if s.startswith('seed') and s[4:].isdigit() and osp.isdir(osp.join(row_dir, s))]
    return found


def _place(source: str, target: str, mode: str) -> None:
    source = osp.realpath(source)
    os.makedirs(osp.dirname(target), exist_ok=True)
    if mode == 'symlink':
        os.symlink(osp.relpath(source, osp.realpath(osp.dirname(target))), target)
    elif mode == 'copy':
        tmp = f'{target}.copy{os.getpid()}'
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, symlinks=True)
        os.replace(tmp, target)
    else:
        raise ValueError(f"--share-mode must be 'symlink' or 'copy', got {mode!r}")


def share_prefix(cfg, work_dir: str, sources: Sequence[str], mode: str = 'symlink') -> List[str]:
    """Link (or copy) into ``work_dir`` the longest prefix of its stages that another run in ``sources``
    finished under the same resolved config and on the same upstream runs; returns the stage names
    placed. Stages ``work_dir`` already has are kept, and sharing stops at the first it has not
    finished. Which stages may be shared is decided by the driver's own markers: a placed stage is one
    the driver then skips."""
    work_dir = osp.abspath(work_dir)
    placed: List[str] = []
    run_ids: Dict[str, Optional[str]] = {}
    donor = None
    for name, stage in _stages(cfg, work_dir).items():
        target = osp.join(work_dir, name)
        if osp.islink(target) and not osp.exists(target):
            os.unlink(target)        # a link whose source was removed: share again or run
        if osp.lexists(target):
            own = _read_marker(target)
            if own is None or own.get('config_hash') != stage.config_hash:
                break                # the run's own stage, unfinished or changed: the driver decides
            run_ids[name] = own.get('run_id')
            continue
        for source in sources:
            if osp.realpath(source) == osp.realpath(work_dir):
                continue
            marker = _read_marker(osp.join(source, name))
            if marker and marker.get('config_hash') == stage.config_hash and \
                    marker.get('upstream', {}) == run_ids:
                _place(osp.join(source, name), target, mode)
                placed.append(name)
                run_ids[name] = marker.get('run_id')
                donor = donor or source
                break
        else:
            break
    if donor is not None and placed and placed[0] == next(iter(_stages(cfg, work_dir))):
        for extra in SHARED_EXTRAS:
            if osp.isdir(osp.join(donor, extra)) and not osp.lexists(osp.join(work_dir, extra)):
                _place(osp.join(donor, extra), osp.join(work_dir, extra), mode)
    return placed


# ---------------------------------------------------------------------------
# quality vs sampling steps
# ---------------------------------------------------------------------------
def _tokenised(obj, work_dir: str):
    from vdot_ext.engine.stages import WORK_DIR_TOKEN, substitute
    return substitute(obj, osp.abspath(work_dir), WORK_DIR_TOKEN)


def quality_vs_steps(run: Run, root: str, student_steps: Sequence[int], teacher_steps: Sequence[int],
                     eval_stage: str, logger) -> Optional[dict]:
    """The student's task metrics at each of ``student_steps`` sampling steps and the teacher's at each of
    ``teacher_steps`` (cached: ``<run>/quality_vs_steps.json``, ``<root>/teacher_curves/<key>.json``)."""
    import torch

    from vdot_ext.engine.evaluate_demo import evaluation_settings
    from vdot_ext.engine.validation_hook import (
        decode,
        held_out_indices,
        mean_metrics,
        renoise_seed,
        sample_noise,
        student_latents,
        teacher_latents,
        uniform_few_step_timesteps,
    )
    from vdot_ext.evaluation.condition_fidelity import condition_fidelity
    from vdot_ext.models.tiny_codecs import TinyWanVAE, file_sha256
    from vdot_ext.models.weights import load_weights
    from vdot_ext.registry import DATASETS, MODELS
    from vdot_ext.utils import get_rng_state, set_rng_state, stable_hash, write_json

    stage = _stages(run.cfg, run.work_dir)[eval_stage]
    done = _read_marker(osp.join(run.work_dir, eval_stage))
    if done is None:
        return None
    call = stage.run_cfg
    for key in ('model', 'checkpoint', 'dataset', 'vae_checkpoint'):
        if key not in call:
            raise ValueError(f'{run.config_path}: stages.{eval_stage}.call has no {key!r}; quality vs steps '
                             'reads the evaluation stage of the demo (evaluate_vdot)')
    settings = evaluation_settings(call)
    samples_per_task = int(settings['samples_per_task'])
    seed = int(settings['seed'])
    teacher_shift = float(settings['teacher_shift'])
    model_cfg = call['model']
    model_cls = MODELS.get(model_cfg['type'])
    generator_shift = float(model_cfg.get('generator_shift',
                                          inspect.signature(model_cls).parameters['generator_shift'].default))

    path = osp.join(run.work_dir, STEPS_FILE)
    key = stable_hash(dict(evaluated=done.get('run_id'), upstream=done.get('upstream'),
                           student_steps=list(student_steps), teacher_steps=list(teacher_steps)))
    # this run's curve, or that of the run whose evaluation this run shares (--share-prefix)
    for candidate in (path, osp.join(osp.dirname(osp.realpath(osp.join(run.work_dir, eval_stage))), STEPS_FILE)):
        if osp.isfile(candidate):
            with open(candidate) as f:
                cached = json.load(f)
            if cached.get('key') == key:
                if candidate != path:
                    write_json(path, dict(cached, row=run.row, seed=run.seed))
                return cached

    rng = get_rng_state()
    start = time.time()
    try:
        with torch.no_grad():
            distiller = MODELS.build(model_cfg)
            load_weights(distiller, call['checkpoint'], field=f'stages.{eval_stage}.call.checkpoint')
            distiller.eval()
            data = DATASETS.build(call['dataset'])
            vae = TinyWanVAE.load(call['vae_checkpoint'])
            indices = held_out_indices(data, samples_per_task)
            items = {index: (data[index], data.get_pixels(index)) for _, index in indices}

            def measure(make_latents):
                records = []
                for task, index in indices:
                    item, pixels = items[index]
                    noise = sample_noise((1, ) + tuple(item['latents'].shape), seed, index)
                    video = decode(vae, make_latents(item, noise, index), int(item.get('num_ref', 0)))
                    metrics = condition_fidelity(task, video, pixels)
                    records.append(dict(task=task, index=index, metrics={k: float(v) for k, v in metrics.items()}))
                return dict(metrics=mean_metrics(records), per_sample=records)

            student = {}
            for n in student_steps:
                timesteps = uniform_few_step_timesteps(int(n), generator_shift)
                student[str(n)] = measure(lambda item, noise, index, ts=timesteps: student_latents(
                    distiller, item, noise, renoise_seed(seed, index), ts))

            weights = model_cfg.get('real_score_weights') or {}
            teacher_key = stable_hash(dict(
                teacher=file_sha256(weights['checkpoint']) if weights.get('checkpoint') else None,
                teacher_cfg=_tokenised(dict(model_cfg.get('real_score', {}), weights=weights), run.work_dir),
                vae=file_sha256(call['vae_checkpoint']),
                text=file_sha256(call['dataset']['text_encoder_checkpoint'])
                if call['dataset'].get('text_encoder_checkpoint') else None,
                dataset=_tokenised(call['dataset'], run.work_dir), samples_per_task=samples_per_task, seed=seed,
                steps=list(teacher_steps), shift=teacher_shift, guidance=distiller.guidance_scale,
                uncond=getattr(distiller, 'uncond', None)))
            teacher_path = osp.join(root, TEACHER_CURVES, f'{teacher_key[:16]}.json')
            teacher = None
            if osp.isfile(teacher_path):
                with open(teacher_path) as f:
                    stored = json.load(f)
                teacher = stored['teacher'] if stored.get('key') == teacher_key else None
            if teacher is None:
                teacher = {}
                for n in teacher_steps:
                    teacher[str(n)] = measure(lambda item, noise, index, n=int(n): teacher_latents(
                        distiller, item, noise, n, teacher_shift))
                write_json(teacher_path, dict(key=teacher_key, teacher=teacher))
    finally:
        set_rng_state(rng)
    result = dict(key=key, row=run.row, seed=run.seed, samples=len(indices), noise_seed=seed,
                  generator_shift=generator_shift, teacher_shift=teacher_shift, student=student, teacher=teacher,
                  seconds=round(time.time() - start, 1))
    write_json(path, result)
    logger.info(f'[{run.row} seed {run.seed}] quality vs steps in {result["seconds"]} s: {path}')
    return result


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
def _mean_std(values: Sequence[float]):
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None, len(values)
    var = sum((v - mean)**2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var), len(values)


def _fmt(mean, std) -> str:
    if mean is None:
        return '–'
    return f'{mean:.3f} ± {std:.3f}' if std is not None else f'{mean:.3f}'


def collect(runs: Sequence[Run], train_stage: str, eval_stage: str) -> dict:
    """Per row: each seed's evaluation metrics, quality-vs-steps curve and validation history."""
    from vdot_ext.engine.validation_hook import read_validation_history
    rows: Dict[str, dict] = OrderedDict()
    for run in runs:
        entry = rows.setdefault(run.row, dict(label=run.label, config=run.config_path, seeds={}))
        seed_entry = dict(work_dir=run.work_dir, status=run.status, shared=run.shared)
        metrics_path = osp.join(run.work_dir, eval_stage, 'metrics.json')
        if osp.isfile(metrics_path):
            with open(metrics_path) as f:
                seed_entry['evaluation'] = json.load(f)
        steps_path = osp.join(run.work_dir, STEPS_FILE)
        if osp.isfile(steps_path):
            with open(steps_path) as f:
                seed_entry['steps'] = json.load(f)
        history = read_validation_history(osp.join(run.work_dir, train_stage))
        if history:
            seed_entry['validation'] = {str(k): v['metrics'] for k, v in history.items()}
        entry['seeds'][str(run.seed)] = seed_entry
    return rows


def _columns(rows: dict) -> List[tuple]:
    """``(task, metric)`` pairs of the student in any evaluation, sorted."""
    columns = set()
    for entry in rows.values():
        for seed in entry['seeds'].values():
            for task, values in seed.get('evaluation', {}).get('metrics', {}).items():
                columns |= {(task, k.split('/', 1)[1]) for k in values if k.startswith('student/')}
    return sorted(columns)


def summary_table(rows: dict) -> dict:
    """``{row: {'n': n, (task, metric): (mean, std, n)}}`` of the student, plus reference prefixes
    (``teacher``, ``real``, ...) pooled over every run."""
    columns = _columns(rows)
    table = OrderedDict()
    pooled: Dict[str, Dict[tuple, list]] = OrderedDict()
    for name, entry in rows.items():
        evaluations = [s['evaluation'] for s in entry['seeds'].values() if 'evaluation' in s]
        cells = dict(n=len(evaluations))
        for task, metric in columns:
            cells[(task, metric)] = _mean_std([e['metrics'].get(task, {}).get(f'student/{metric}')
                                               for e in evaluations])
        table[name] = cells
        for e in evaluations:
            for task, values in e['metrics'].items():
                for key, value in values.items():
                    if '/' in key and not key.startswith('student/'):
                        prefix, metric = key.split('/', 1)
                        # evaluate_vdot's rows: teacher (many steps), teacher_few (the student's count)
                        steps = e.get({'teacher': 'teacher_steps', 'teacher_few': 'teacher_few_steps'}.get(prefix, ''))
                        label = prefix + (f', {steps} steps' if steps is not None else '')
                        pooled.setdefault(label, {}).setdefault((task, metric), []).append(value)
    references = OrderedDict((label, {col: _mean_std(vals) for col, vals in cols.items()})
                             for label, cols in pooled.items())
    return dict(columns=columns, rows=table, references=references)


def steps_table(rows: dict) -> dict:
    """``{(task, metric): {row: {steps: (mean, std, n)}}}`` and the teacher's, from the steps curves."""
    out: Dict[tuple, dict] = OrderedDict()
    teacher: Dict[tuple, Dict[str, list]] = OrderedDict()
    for name, entry in rows.items():
        curves = [s['steps'] for s in entry['seeds'].values() if 'steps' in s]
        for curve in curves:
            for steps, result in curve['student'].items():
                for task, metrics in result['metrics'].items():
                    for metric, value in metrics.items():
                        out.setdefault((task, metric), OrderedDict()).setdefault(name, {}) \
                            .setdefault(int(steps), []).append(value)
            for steps, result in curve['teacher'].items():
                for task, metrics in result['metrics'].items():
                    for metric, value in metrics.items():
                        teacher.setdefault((task, metric), {}).setdefault(int(steps), []).append(value)
    summary = OrderedDict()
    for col in sorted(out):
        summary[col] = dict(
            rows=OrderedDict((name, {s: _mean_std(v) for s, v in sorted(per.items())})
                             for name, per in out[col].items()),
            teacher={s: _mean_std(v) for s, v in sorted(teacher.get(col, {}).items())})
    return summary


def iterations_table(rows: dict) -> dict:
    """``{(task, metric): {row: {iteration: (mean, std, n)}}}`` from the validation histories."""
    out: Dict[tuple, dict] = OrderedDict()
    for name, entry in rows.items():
        for seed in entry['seeds'].values():
            for iteration, metrics in seed.get('validation', {}).items():
                for task, values in metrics.items():
                    for metric, value in values.items():
                        out.setdefault((task, metric), OrderedDict()).setdefault(name, {}) \
                            .setdefault(int(iteration), []).append(value)
    return OrderedDict((col, OrderedDict((name, {i: _mean_std(v) for i, v in sorted(per.items())})
                                         for name, per in out[col].items()))
                       for col in sorted(out))


def markdown(rows: dict, summary: dict, steps: dict, command: str) -> str:
    columns = summary['columns']
    lines = ['# Ablations (VDOT paper Table 3 on the tiny recipe)', '',
             f'Command: `{command}`', '',
             'Student metrics of each row: mean ± sample standard deviation over seeds (n seeds), from '
             '`<row>/seed<k>/evaluate/metrics.json`. Reference rows pool every run.', '']
    header = ['row', 'n'] + [f'{task} {metric}' for task, metric in columns]
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for name, cells in summary['rows'].items():
        label = rows[name]['label'] or name
        lines.append('| ' + ' | '.join([f'{label} (`{name}`)', str(cells['n'])]
                                       + [_fmt(*cells[col][:2]) for col in columns]) + ' |')
    for label, cells in summary['references'].items():
        n = max((v[2] for v in cells.values()), default=0)
        lines.append('| ' + ' | '.join([f'*{label}* (reference)', str(n)]
                                       + [_fmt(*cells.get(col, (None, None, 0))[:2]) for col in columns]) + ' |')
    if steps:
        lines += ['', '## Quality vs sampling steps', '',
                  'The student at n sampling steps (n uniform steps warped by the generator shift; 4 = its '
                  'training schedule) and the teacher (Euler, CFG), on the evaluation\'s held-out VCUs with '
                  'noise seeded per sample (the same for every model and step count). Mean ± std over seeds.']
        for (task, metric), data in steps.items():
            columns = sorted({s for per in data['rows'].values() for s in per} | set(data['teacher']))
            lines += ['', f'**{task} {metric}**', '',
                      '| row | ' + ' | '.join(f'{s} steps' for s in columns) + ' |', '|---|' + '---|' * len(columns)]
            table_rows = list(data['rows'].items()) + ([('*teacher*', data['teacher'])] if data['teacher'] else [])
            for name, per in table_rows:
                label = name if name.startswith('*') else f'`{name}`'
                lines.append(f'| {label} | ' + ' | '.join(_fmt(*per[s][:2]) if s in per else '–' for s in columns)
                             + ' |')
    lines += ['', f'Plots: `{STEPS_PLOT}` (quality vs sampling steps), `{ITERATIONS_PLOT}` (quality vs '
              'training iterations, from the stage-2 ValidationHook; the paper\'s Fig. 5).', '']
    return '\n'.join(lines)


def _save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    from vdot_ext.utils import atomic_write
    try:
        with atomic_write(path) as f:
            fig.savefig(f, dpi=90, format='png')
    finally:
        plt.close(fig)


def _axes(n: int):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = min(2, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis('off')
    return fig, list(axes.flat)


def plot_steps(steps: dict, path: str) -> bool:
    """Student metric vs sampling steps per row (mean ± std), teacher points; one panel per metric."""
    if not steps:
        return False
    fig, axes = _axes(len(steps))
    for ax, ((task, metric), data) in zip(axes, steps.items()):
        ticks = set()
        for name, per in data['rows'].items():
            xs = sorted(s for s in per if per[s][0] is not None)
            ticks |= set(xs)
            ax.errorbar(xs, [per[s][0] for s in xs], yerr=[per[s][1] or 0.0 for s in xs], marker='o',
                        ms=3, lw=1, capsize=2, label=name)
        xs = sorted(s for s, v in data['teacher'].items() if v[0] is not None)
        if xs:
            ticks |= set(xs)
            ax.errorbar(xs, [data['teacher'][s][0] for s in xs], yerr=[data['teacher'][s][1] or 0.0 for s in xs],
                        marker='s', color='black', ls='--', lw=1, capsize=2, label='teacher')
        ax.set_xscale('log', base=2)
        ax.set_xticks(sorted(ticks))
        ax.set_xticklabels([str(t) for t in sorted(ticks)])
        ax.set_xlabel('sampling steps', fontsize=8)
        ax.set_title(f'{task}: {metric}', fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def plot_iterations(iterations: dict, path: str) -> bool:
    """Metric vs training iteration per row (mean, ±std band); one panel per metric (paper Fig. 5)."""
    if not iterations:
        return False
    fig, axes = _axes(len(iterations))
    for ax, ((task, metric), per_row) in zip(axes, iterations.items()):
        for name, per in per_row.items():
            xs = sorted(i for i in per if per[i][0] is not None)
            mean = [per[i][0] for i in xs]
            std = [per[i][1] or 0.0 for i in xs]
            line = ax.plot(xs, mean, marker='o', ms=3, lw=1, label=name)[0]
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel('training iteration (stage 2)', fontsize=8)
        ax.set_title(f'{task}: {metric}', fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def _jsonable(obj):
    if isinstance(obj, dict):
        return {(' '.join(map(str, k)) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_report(root: str, runs: Sequence[Run], train_stage: str, eval_stage: str, command: str) -> dict:
    """Table, plots and JSON of every run found (see the module docstring); returns the paths written."""
    from vdot_ext.utils import atomic_write, write_json
    rows = collect(runs, train_stage, eval_stage)
    summary = summary_table(rows)
    steps = steps_table(rows)
    iterations = iterations_table(rows)
    os.makedirs(root, exist_ok=True)
    written = dict(table=osp.join(root, TABLE_FILE), results=osp.join(root, RESULTS_FILE))
    with atomic_write(written['table'], 'w') as f:
        f.write(markdown(rows, summary, steps, command))
    write_json(written['results'], _jsonable(dict(command=command, rows=rows, summary=summary, steps=steps,
                                                  iterations=iterations)))
    if plot_steps(steps, osp.join(root, STEPS_PLOT)):
        written['steps_plot'] = osp.join(root, STEPS_PLOT)
    if plot_iterations(iterations, osp.join(root, ITERATIONS_PLOT)):
        written['iterations_plot'] = osp.join(root, ITERATIONS_PLOT)
    return written


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(prog='python -m vdot_ext.tools.ablate', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', nargs='+', required=True,
                        help="row names in --config-dir (e.g. full no_otd), 'table3' (the paper's six rows), "
                        "'all', or config paths")
    parser.add_argument('--seeds', nargs='+', type=int, default=[0])
    parser.add_argument('--work-root', default=osp.join('work_dirs', 'ablations'),
                        help='each run works in <work-root>/<row>/seed<k>; the table and plots go here')
    parser.add_argument('--share-prefix', action='store_true',
                        help='reuse finished stages of other runs under the root whose resolved config and '
                        'upstream runs are identical (codecs, teacher, stage 1 run once)')
    parser.add_argument('--share-mode', choices=('symlink', 'copy'), default='symlink')
    parser.add_argument('--seed-stages', nargs='+', default=['stage2'], metavar='STAGE',
                        help='stages the seed applies to (default: stage2; shared stages keep the config seed)')
    parser.add_argument('--student-steps', nargs='*', type=int, default=[1, 2, 4, 8],
                        help='sampling steps of the quality-vs-steps curve (none: skip the curve)')
    parser.add_argument('--teacher-steps', nargs='*', type=int, default=[4, 40])
    parser.add_argument('--train-stage', default='stage2', help='the stage whose ValidationHook history is plotted')
    parser.add_argument('--eval-stage', default='evaluate', help='the stage that writes metrics.json')
    parser.add_argument('--config-dir', default=None, help=f'where row names are looked up (default {ROW_FOLDER})')
    parser.add_argument('--report-only', action='store_true', help='run nothing; tabulate what the root holds')
    parser.add_argument('--fail-fast', action='store_true', help='stop at the first failed run (default: go on)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override entries of every row (keys must exist), e.g. '
                        'stages.stage2.runner.train_cfg.max_iters=10')
    parser.add_argument('--cfg-options-allow-new', action='store_true',
                        help='let --cfg-options add keys the rows do not have')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.logging import MMLogger

    from vdot_ext.engine.compat import install_safe_checkpoint_loader
    from vdot_ext.engine.config_checks import ConfigCheckError
    command = 'python -m vdot_ext.tools.ablate ' + ' '.join(sys.argv[1:] if argv is None else argv)
    root = osp.abspath(args.work_root)
    try:
        rows = resolve_rows(args.rows, args.config_dir or default_row_folder())
        runs = []
        for seed in args.seeds:          # seed-major: whole comparisons first
            for row, path in rows:
                cfg, kept = load_run_config(path, seed, args.seed_stages, args.cfg_options,
                                            args.cfg_options_allow_new)
                runs.append(Run(row=row, seed=seed, config_path=path, cfg=cfg, kept=kept,
                                work_dir=osp.join(root, row, f'seed{seed}'),
                                label=str(cfg.get('ablation_label', row))))
    except (ConfigCheckError, ValueError) as err:
        sys.exit(f'error: {err}')
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit(f'error: --seeds {args.seeds}: a seed is repeated')
    os.makedirs(root, exist_ok=True)
    logger = MMLogger.get_instance(f'vdot_ablate_{time.time_ns()}', log_file=osp.join(root, 'ablate.log'),
                                   file_mode='a')
    logger.info(f'{command}: {len(runs)} runs ({len(rows)} rows x {len(args.seeds)} seeds) in {root}')
    for run in runs:
        if run.kept and run.seed == args.seeds[0]:
            logger.warning(f'[{run.row}] --cfg-options not applied to keys that define the row (ablation_fixed): '
                           f'kept {", ".join(run.kept)}')
    if not args.report_only:
        install_safe_checkpoint_loader()
        threads = runs[0].cfg.get('torch_num_threads') if runs else None
        if threads is not None:
            import torch
            torch.set_num_threads(int(threads))
        for run in runs:
            if not _execute(run, root, args, logger) and args.fail_fast:
                break
    written = write_report(root, runs, args.train_stage, args.eval_stage, command)
    failed = [r for r in runs if r.status == 'failed']
    for name, path in written.items():
        logger.info(f'{name}: {path}')
    if failed:
        logger.error('failed runs: ' + ', '.join(f'{r.row}/seed{r.seed} ({r.error})' for r in failed)
                     + '; rerun the same command to continue')
        return 1
    return 0


def _execute(run: Run, root: str, args, logger) -> bool:
    from vdot_ext.engine.stages import run_stages
    where = f'[{run.row} seed {run.seed}]'
    try:
        if args.share_prefix:
            run.shared = share_prefix(run.cfg, run.work_dir, run_dirs(root), args.share_mode)
            if run.shared:
                logger.info(f'{where} shared from another run ({args.share_mode}): {", ".join(run.shared)}')
        logger.info(f'{where} running in {run.work_dir}')
        run_stages(run.cfg, run.work_dir)
        if args.student_steps:
            quality_vs_steps(run, root, args.student_steps, args.teacher_steps, args.eval_stage, logger)
        run.status = 'done'
        return True
    except Exception as exc:  # one failed run must not stop the sweep (--fail-fast does)
        run.status, run.error = 'failed', f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}'
        logger.error(f'{where} failed:\n{traceback.format_exc()}')
        return False


if __name__ == '__main__':
    sys.exit(main())
