"""The MoGAN recipe over several training seeds, and its mean ± std motion table (docs/DESIGN.md §13).

    python -m vdot_ext.tools.mogan_seeds --seeds 0 1 2 --work-root work_dirs/mogan_seeds

Each seed k runs the recipe (default ``configs/mogan/mogan_tiny.py``) through the stage driver
(``vdot_ext.engine.stages``) in its own work dir ``<root>/<recipe>/seed<k>``, one stage at a time, and the
table is ``<root>/mogan_seeds.md`` (and ``.json``): per model (DMD-only, MoGAN, MoGAN+OTD, the stage-1 student,
the teacher, the real clips, and any other model the evaluation lists), the mean ± sample std over seeds of
every number ``evaluate_motion`` reports, with the wall and CPU time of every stage run.

**What a seed changes.** In each *seeded stage* (default: every training stage whose model is a
``MoGANDistiller``, i.e. ``dmd_only``, ``mogan``, ``mogan_otd`` and the Table-2 stages), seed k sets the
runner's ``randomness.seed = k`` and the model's ``seed = k`` (:func:`load_seed_config`). The runner
seeds Python, numpy and torch before it builds the model and the data loader, so k changes the motion
discriminator's random initialisation (its patch embedding, head tokens and MLPs; its DiT blocks are the
teacher's), the data order (``InfiniteSampler``'s shuffle seed is drawn from the seeded numpy), the generator's
noise, the fake score's timesteps and noise, the decoding windows, the R1/R2 perturbations, and (the model's
``seed``) the rollout's exit steps.

**What is shared.** The stages before the first seeded one (codecs, teacher, stage 1, D's prompt) have the same
resolved config in every seed; they run once, in the first seed's work dir (or come from ``--share-from``, e.g.
a finished demo or recipe work dir), and are linked into the others (``vdot_ext.tools.ablate.share_prefix``: only
a stage whose marker has the same config hash and the same upstream runs is shared; ``--share-mode copy``
copies). The evaluation is not seeded: every seed's models are sampled from the same held-out prompts and the
same noise (``stages.motion_eval.call.seed``), so the spread is that of training.

**Resuming.** Rerunning the same command continues: finished stages are skipped by their markers, an interrupted
training stage resumes from its checkpoint, and the table is rewritten from every finished seed.
``--report-only`` only rewrites the table. ``--cfg-options`` applies to every seed (keys must exist).
"""
import argparse
import datetime
import json
import os
import os.path as osp
import platform
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence

DEFAULT_CONFIG = osp.join('configs', 'mogan', 'mogan_tiny.py')
TABLE_FILE = 'mogan_seeds.md'
RESULTS_FILE = 'mogan_seeds.json'
TIMINGS_FILE = 'timings.json'
EVAL_STAGE = 'motion_eval'
SEEDED_MODEL_TYPES = ('MoGANDistiller', )
DONE_FILE = 'stage_done.json'     # vdot_ext.engine.stages.DONE_FILE


def default_config() -> str:
    """``configs/mogan/mogan_tiny.py`` of the source checkout, of the installed package (``.mim``) or of the
    current directory, the first that exists."""
    from vdot_ext.tools.ablate import find_in_checkout
    path = find_in_checkout(DEFAULT_CONFIG)
    if path is not None:
        return path
    raise FileNotFoundError(f'--config: no {DEFAULT_CONFIG} in the source checkout, the installed package or '
                            f'{os.getcwd()}; give the recipe path')


def seeded_stages(cfg) -> List[str]:
    """The training stages whose model is a ``MoGANDistiller``, in stage order: the post-training runs."""
    order = list(cfg.get('stage_order') or cfg.stages.keys())
    names = []
    for name in order:
        runner = (cfg.stages.get(name) or {}).get('runner')
        if runner and (runner.get('model') or {}).get('type') in SEEDED_MODEL_TYPES:
            names.append(name)
    return names


def load_seed_config(path: str, seed: int, seeded: Sequence[str], cfg_options: Optional[dict] = None):
    """The recipe with ``cfg_options`` merged (keys must exist) and seed k set in the ``seeded`` training stages:
    ``runner.randomness.seed = k`` (the recipe-level ``randomness`` otherwise) and ``runner.model.seed = k``."""
    from mmengine.config import Config

    from vdot_ext.engine.config_checks import ConfigCheckError, check_cfg_options
    cfg = Config.fromfile(path)
    if 'stages' not in cfg:
        raise ConfigCheckError(f'{path}: not a staged config (no "stages")')
    if cfg_options:
        check_cfg_options(cfg, cfg_options, filename=path)
        cfg.merge_from_dict(cfg_options)
    for name in seeded:
        runner = (cfg.stages.get(name) or {}).get('runner')
        if runner is None:
            raise ConfigCheckError(f'{path}: --seed-stages {name}: no training stage stages.{name}.runner '
                                   f'(stages: {sorted(cfg.stages)})')
        runner['randomness'] = dict(dict(cfg.get('randomness') or {}), **dict(runner.get('randomness') or {}))
        runner['randomness']['seed'] = int(seed)
        runner['model']['seed'] = int(seed)
    cfg.launcher = 'none'
    return cfg


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the stages run in this process)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _read_json(path: str) -> Optional[dict]:
    if not osp.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def run_seed(cfg, work_dir: str, sources: Sequence[str], share_mode: str, logger,
             force_rerun: Sequence[str] = ()) -> Dict[str, dict]:
    """Share what another run finished, then run the remaining stages one by one; returns the wall and CPU
    seconds of each stage run now (``{stage: dict(wall_s, cpu_s)}``), merged into ``<work_dir>/timings.json``.

    ``force_rerun``: stages to run again although finished (the driver moves their outputs, or the link to a
    shared stage, to ``<work_dir>/replaced/``), e.g. the evaluation after its code changed."""
    from vdot_ext.engine.stages import run_stages
    from vdot_ext.tools.ablate import share_prefix
    from vdot_ext.utils import write_json
    shared = share_prefix(cfg, work_dir, sources, share_mode)
    if shared:
        logger.info(f'{work_dir}: shared ({share_mode}) {", ".join(shared)}')
    timings_path = osp.join(work_dir, TIMINGS_FILE)
    timings = _read_json(timings_path) or {}
    cascade = False      # a rerun stage reruns every later one (they consume its outputs; the driver's rule)
    for name in cfg.stage_order:
        forced = cascade = cascade or name in force_rerun
        if osp.isfile(osp.join(work_dir, name, DONE_FILE)) and name in timings and not forced:
            continue
        already = osp.isfile(osp.join(work_dir, name, DONE_FILE)) and not forced
        wall, cpu = time.time(), cpu_seconds()
        run_stages(cfg, work_dir, only=[name], force_rerun=[name] if forced else ())
        if already:                 # shared or finished before: no time of ours
            timings.setdefault(name, dict(wall_s=None, cpu_s=None, shared=osp.islink(osp.join(work_dir, name))))
        else:
            timings[name] = dict(wall_s=round(time.time() - wall, 1), cpu_s=round(cpu_seconds() - cpu, 1))
            logger.info(f'{work_dir}: stage {name} wall {timings[name]["wall_s"]} s, CPU {timings[name]["cpu_s"]} s')
        write_json(timings_path, timings)
    return timings


# (metric, column header, scale): the warping error is ~1e-3 on the tiny clips, shown in units of 1e-3
COLUMNS = (('dynamic_degree', 'dynamics degree ↑', 1.0), ('motion_magnitude', 'motion magnitude', 1.0),
           ('warping_error', 'warping error ×10⁻³ ↓', 1e3), ('valid_fraction', 'non-occluded fraction', 1.0))


def _fmt(cell: dict, scale: float = 1.0) -> str:
    return f'{cell["mean"] * scale:.3f} ± {cell["std"] * scale:.3f}'


def report(root: str, runs: Sequence[str], seeds: Sequence[int], command: str, seeded: Sequence[str]) -> dict:
    """Write ``<root>/mogan_seeds.md`` and ``.json`` from the finished runs; returns the JSON record."""
    from vdot_ext.engine.evaluate_motion import METRICS_FILE, summarize_motion_runs
    from vdot_ext.evaluation.motion_metrics import summarize
    from vdot_ext.utils import atomic_write, write_json
    finished = [(seed, run) for seed, run in zip(seeds, runs) if osp.isfile(osp.join(run, EVAL_STAGE, METRICS_FILE))]
    keys = tuple(key for key, _, _ in COLUMNS)
    records = [_read_json(osp.join(run, EVAL_STAGE, METRICS_FILE)) for _, run in finished]
    per_model: Dict[str, List[dict]] = {}
    for record in records:
        entries = dict(record['models'], **({'real clips': record['real']} if record.get('real') else {}))
        for name, values in entries.items():
            per_model.setdefault(name, []).append(values)
    summary = {name: summarize(values, keys) for name, values in per_model.items()}
    if finished:
        summarize_motion_runs([osp.join(run, EVAL_STAGE) for _, run in finished])   # refuses mixed estimators
    timings = {f'seed{seed}': _read_json(osp.join(run, TIMINGS_FILE)) or {} for seed, run in zip(seeds, runs)}
    lines = ['# MoGAN tiny recipe: motion metrics over training seeds', '',
             f'Command: `{command}`', '',
             f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; '
             f'written {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}.', '',
             f'Seeds {", ".join(str(s) for s, _ in finished) or "none finished"} ({len(finished)} of {len(seeds)}); '
             f'seeded stages: {", ".join(seeded)}. Estimator: {records[0]["estimator"] if records else "–"}; '
             f'{records[0]["num_samples"] if records else "–"} held-out samples per model, the same prompts and '
             'noise in every seed. Mean ± sample std over seeds.', '',
             '| model | seeds | ' + ' | '.join(header for _, header, _ in COLUMNS) + ' |',
             '|---|---|' + '---|' * len(COLUMNS)]
    for name, cells in summary.items():
        lines.append(f'| {name} | {cells[keys[0]]["n"]} | '
                     + ' | '.join(_fmt(cells[key], scale) for key, _, scale in COLUMNS) + ' |')
    lines += ['', 'Wall and CPU seconds of each stage run (shared stages: where they ran):', '',
              '| seed | ' + ' | '.join(['stage', 'wall s', 'CPU s']) + ' |', '|---|---|---|---|']
    for seed, stages in timings.items():
        for stage, value in stages.items():
            if value.get('wall_s') is not None:
                lines.append(f'| {seed} | {stage} | {value["wall_s"]} | {value["cpu_s"]} |')
    lines.append('')
    table = '\n'.join(lines)
    os.makedirs(root, exist_ok=True)
    with atomic_write(osp.join(root, TABLE_FILE), 'w') as handle:
        handle.write(table)
    record = dict(command=command, seeds=[s for s, _ in finished], runs=[r for _, r in finished],
                  seeded_stages=list(seeded), summary=summary, timings=timings,
                  per_seed={f'seed{s}': m for (s, _), m in zip(finished, records)})
    write_json(osp.join(root, RESULTS_FILE), record)
    return dict(record, table=table)


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(prog='python -m vdot_ext.tools.mogan_seeds', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=None, help=f'the staged MoGAN recipe (default {DEFAULT_CONFIG})')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--work-root', default=osp.join('work_dirs', 'mogan_seeds'),
                        help='seed k works in <work-root>/<recipe>/seed<k>; the table goes here')
    parser.add_argument('--share-from', nargs='*', default=[], metavar='WORK_DIR',
                        help='finished work dirs (the demo, the recipe) whose identical stages are reused')
    parser.add_argument('--share-mode', choices=('symlink', 'copy'), default='symlink')
    parser.add_argument('--seed-stages', nargs='+', default=None, metavar='STAGE',
                        help='stages the seed applies to (default: the MoGANDistiller training stages)')
    parser.add_argument('--force-rerun', nargs='+', default=[], metavar='STAGE',
                        help='rerun these finished stages in every seed (e.g. motion_eval after its code changed); '
                        'not resumable: a second call reruns them again')
    parser.add_argument('--report-only', action='store_true', help='run nothing; tabulate what the root holds')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override entries of the recipe for every seed (keys must exist)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.config import Config
    from mmengine.logging import MMLogger

    from vdot_ext.engine.compat import install_safe_checkpoint_loader
    from vdot_ext.engine.config_checks import ConfigCheckError
    from vdot_ext.tools.ablate import run_dirs
    command = 'python -m vdot_ext.tools.mogan_seeds ' + ' '.join(sys.argv[1:] if argv is None else argv)
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit(f'error: --seeds {args.seeds}: a seed is repeated')
    root = osp.abspath(args.work_root)
    try:
        path = osp.abspath(args.config) if args.config else default_config()
        if not osp.isfile(path):
            raise ConfigCheckError(f'--config {args.config}: no such file')
        seeded = args.seed_stages or seeded_stages(Config.fromfile(path))
        if not seeded:
            raise ConfigCheckError(f'{path}: no MoGANDistiller training stage to seed; name them with --seed-stages')
        configs = [load_seed_config(path, seed, seeded, args.cfg_options) for seed in args.seeds]
    except (ConfigCheckError, ValueError, FileNotFoundError) as err:
        sys.exit(f'error: {err}')
    recipe = osp.splitext(osp.basename(path))[0]
    runs = [osp.join(root, recipe, f'seed{seed}') for seed in args.seeds]
    os.makedirs(root, exist_ok=True)
    logger = MMLogger.get_instance(f'vdot_mogan_seeds_{time.time_ns()}', log_file=osp.join(root, 'mogan_seeds.log'),
                                   file_mode='a')
    logger.info(f'{command}: seeds {args.seeds} of {path} in {root}; seeded stages {seeded}')
    failed = []
    if not args.report_only:
        install_safe_checkpoint_loader()
        threads = configs[0].get('torch_num_threads')
        if threads is not None:
            import torch
            torch.set_num_threads(int(threads))
        for seed, cfg, run in zip(args.seeds, configs, runs):
            sources = run_dirs(root) + [osp.abspath(d) for d in args.share_from]
            try:
                run_seed(cfg, run, sources, args.share_mode, logger, args.force_rerun)
            except ConfigCheckError as err:         # a changed recipe: the same for every seed
                logger.error(f'seed {seed}: {err}')
                return 1
            except Exception:  # noqa: BLE001  one failed seed must not lose the others; rerun continues it
                import traceback
                logger.error(f'seed {seed} failed:\n{traceback.format_exc()}')
                failed.append(seed)
    result = report(root, runs, args.seeds, command, seeded)
    print(result['table'])
    logger.info(f'table: {osp.join(root, TABLE_FILE)}')
    if failed:
        logger.error(f'failed seeds: {failed}; rerun the same command to continue')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
