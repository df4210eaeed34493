"""Train a vdot_ext config: ``mim train vdot_ext CONFIG`` runs this file.

A config with ``stages`` runs the whole recipe (e.g. the tiny demo: teacher,
stage 1, AccWanInit + stage 2, evaluation) stage by stage; any other config is
one mmengine Runner.
"""
import argparse
import os
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train with vdot_ext (VDOT distillation)')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--work-dir', help='directory for logs, checkpoints and outputs')
    parser.add_argument('--resume', action='store_true',
                        help='single-runner configs: resume from the latest checkpoint '
                        'in the work dir (staged configs always resume)')
    parser.add_argument('--stages', nargs='+', default=None,
                        help='staged configs: run only these stages (in config order)')
    parser.add_argument('--cfg-options', nargs='+', default=None, metavar='KEY=VALUE',
                        help='override config entries, e.g. '
                        'stages.stage2.runner.train_cfg.max_iters=10')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmengine.config import Config

    from vdot_ext.engine.compat import enable_trusted_local_checkpoints
    from vdot_ext.engine.config_checks import check_required_fields
    from vdot_ext.engine.deepspeed_strategy import build_runner
    from vdot_ext.engine.stages import run_stages

    if not osp.isfile(args.config):
        sys.exit(f'config file {args.config!r} does not exist')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(_parse_options(args.cfg_options))
    cfg.launcher = args.launcher
    if cfg.get('torch_num_threads') is not None:
        # tiny models are bound by per-op overhead, where extra intra-op threads
        # only contend (badly so on a shared machine); configs may pin the count
        import torch
        torch.set_num_threads(int(cfg.torch_num_threads))
    check_required_fields(cfg, args.config)
    work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    enable_trusted_local_checkpoints()

    if 'stages' in cfg:
        run_stages(cfg, work_dir, only=args.stages)
        return
    if args.stages:
        sys.exit(f'--stages given but {args.config} has no "stages" field')
    cfg.work_dir = work_dir
    if args.resume:
        cfg.resume = True
    # a config with `strategy` (RoleDeepSpeedStrategy) runs on mmengine's
    # FlexibleRunner, any other on the plain Runner
    runner = build_runner(cfg)
    runner.train()


def _parse_options(options):
    """KEY=VALUE pairs with Python-literal values (mmengine's DictAction rules)."""
    from mmengine.config import DictAction
    parsed = {}
    for item in options:
        if '=' not in item:
            raise SystemExit(f'--cfg-options: expected KEY=VALUE, got {item!r}')
        key, value = item.split('=', maxsplit=1)
        parsed[key] = DictAction._parse_iterable(value)
    return parsed


if __name__ == '__main__':
    main()
