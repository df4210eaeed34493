"""Train a vdot_ext config: ``mim train vdot_ext CONFIG`` runs this file.

A config with ``stages`` runs the whole recipe (e.g. the tiny demo: teacher,
stage 1, AccWanInit + stage 2, evaluation) stage by stage
(``vdot_ext.engine.stages``); any other config is one mmengine Runner.

Everything that can be checked before work starts is checked first
(docs/DESIGN.md §11): ``--cfg-options`` keys must exist in the config, every
stage's types, constructor keywords and required ``'???'`` values, and a
config without ``strategy`` is not launched on several processes. Such an
error exits with status 1 and a message, before any stage runs.
"""
import argparse
import os
import os.path as osp
import sys


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Train with vdot_ext (VDOT distillation)')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--work-dir', help='directory for logs, checkpoints and outputs')
    parser.add_argument(
        '--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
        help='single-runner configs: resume from CHECKPOINT (a .pth file or a DeepSpeed checkpoint '
        'folder), or, without a value, from the latest valid checkpoint in the work dir. Staged '
        'configs always resume an interrupted stage')
    parser.add_argument('--stages', nargs='+', default=None, metavar='STAGE',
                        help='staged configs: run only these stages (in config order)')
    parser.add_argument(
        '--force-rerun', nargs='+', default=[], metavar='STAGE',
        help='staged configs: rerun these finished stages and every stage after them (they consume '
        'its outputs); previous outputs are moved to <work_dir>/replaced/<time>/')
    parser.add_argument(
        '--rerun-changed', action='store_true',
        help='staged configs: rerun every stage whose config differs from the one it ran with (and '
        'every stage after it) instead of refusing')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. stages.stage2.runner.train_cfg.max_iters=10; '
                        'a key that matches nothing in the config is an error')
    parser.add_argument('--cfg-options-allow-new', action='store_true',
                        help='let --cfg-options add keys the config does not have')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    from vdot_ext.engine.config_checks import ConfigCheckError
    try:
        cfg, work_dir = _prepare(args)
        if 'stages' in cfg:
            from vdot_ext.engine.stages import run_stages
            run_stages(cfg, work_dir, only=args.stages, force_rerun=args.force_rerun,
                       rerun_changed=args.rerun_changed)
            return
        runner = _build_single_runner(cfg, args, work_dir)
    except ConfigCheckError as err:
        sys.exit(f'error: {err}')
    runner.train()


def _prepare(args):
    """Load the config, apply and check the options, install the safe loader."""
    from mmengine.config import Config

    from vdot_ext.engine.compat import install_safe_checkpoint_loader
    from vdot_ext.engine.config_checks import ConfigCheckError, check_cfg_options, check_required_fields

    if not osp.isfile(args.config):
        raise ConfigCheckError(f'config file {args.config!r} does not exist')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        check_cfg_options(cfg, args.cfg_options, allow_new=args.cfg_options_allow_new,
                          filename=args.config)
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    staged = 'stages' in cfg
    for flag, value in (('--stages', args.stages), ('--force-rerun', args.force_rerun),
                        ('--rerun-changed', args.rerun_changed)):
        if value and not staged:
            raise ConfigCheckError(f'{flag} given but {args.config} has no "stages" field')
    if staged and args.resume not in (None, 'auto'):
        raise ConfigCheckError(f'--resume {args.resume}: a staged recipe resumes each interrupted stage '
                               'from its own folder; give a checkpoint path only with a single-runner config')
    if cfg.get('torch_num_threads') is not None:
        # tiny models are bound by per-op overhead, where extra intra-op threads
        # only contend (badly so on a shared machine); configs may pin the count
        import torch
        torch.set_num_threads(int(cfg.torch_num_threads))
    check_required_fields(cfg, args.config)
    work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    # resume and load_from never unpickle code (docs/DESIGN.md §8)
    install_safe_checkpoint_loader()
    return cfg, work_dir


def _build_single_runner(cfg, args, work_dir):
    from mmengine.logging import print_log

    from vdot_ext.engine.checkpointing import resolve_resume_checkpoint
    from vdot_ext.engine.config_checks import (
        ConfigCheckError,
        check_build_specs,
        check_distributed_launch,
        raise_problems,
    )
    from vdot_ext.engine.deepspeed_strategy import build_runner

    check_distributed_launch(cfg, args.launcher, args.config)
    raise_problems(check_build_specs(cfg), args.config, 'build specs that would fail when the run starts')
    cfg.work_dir = work_dir
    resume = args.resume
    if resume is None and cfg.get('resume') is True and not cfg.get('load_from'):
        resume = 'auto'  # `resume=True` in the config: the same as --resume
    if resume is not None:
        if resume != 'auto' and not osp.exists(resume):
            raise ConfigCheckError(f'--resume {resume}: no such file or folder')
        try:
            checkpoint = resolve_resume_checkpoint(work_dir if resume == 'auto' else resume)
        except (ValueError, RuntimeError) as err:  # damaged checkpoints, named
            raise ConfigCheckError(str(err)) from err
        if checkpoint is None and resume != 'auto':
            raise ConfigCheckError(f'--resume {resume}: not a checkpoint (expected a .pth file or a '
                                   'DeepSpeed-strategy checkpoint folder)')
        if checkpoint is None:
            print_log(f'--resume: no checkpoint in {work_dir}; starting from scratch', logger='current')
        cfg.resume = checkpoint is not None
        if checkpoint is not None:
            cfg.load_from = checkpoint
    # a config with `strategy` (RoleDeepSpeedStrategy) runs on mmengine's
    # FlexibleRunner, any other on the plain Runner
    return build_runner(cfg)


if __name__ == '__main__':
    main()
