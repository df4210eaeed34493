#!/usr/bin/env python
"""Stage-2 ``train_step`` of the 1.3B VDOTDistiller on one GPU: seconds per step and peak
memory next to ``python -m vdot_ext.tools.plan_memory``'s estimate.

    python benchmarks/gpu/train_step_check.py [--dry-run] [--iters 6]

The run is the user's own path: ``configs/vdot_wan1.3b.py`` (VACE-Wan2.1-1.3B preset, bf16,
gradient checkpointing, RoleDeepSpeedStrategy with ZeRO-2, OTD + DMD / GAN, TTUR 5) started
by ``vdot_ext.tools.train`` (what ``mim train`` runs) as one DeepSpeed process, with only
these changes: random weights (no ``pretrained``, no AccWanInit), random encoded batches of
the real geometry (81×480×832 → latents 16×21×60×104, 512 text tokens of 4096), no
checkpoints, a timing hook. Iterations 0..5 cover a generator DM step (k = 0), critic GAN and
denoising steps, and a generator GAN step (k = 5). --dry-run: the tiny VACE preset, 2×8×8
latents, fp32, gloo, on the CPU.
"""
import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import ROOT, add_root_to_path, device_name, emit  # noqa: E402

add_root_to_path()
GIB = 1024**3


def build_config(dry: bool, iters: int, work_dir: str):
    from mmengine.config import Config
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'vdot_wan1.3b.py'))
    model = cfg.model
    model.real_score.pretrained = None
    model.generator_init = None
    if dry:
        model.real_score.preset = 'tiny-vace'
        model.discriminator.update(taps=(1, 2, 3), bottleneck_dim=32, num_heads=2)
        data = dict(frames=2, height=8, width=8, text_len=8, text_dim=32)
        cfg.strategy.config.bf16 = dict(enabled=False)
        cfg.strategy.config.zero_optimization.overlap_comm = False
        cfg.env_cfg.dist_cfg = dict(backend='gloo')
    else:
        model.real_score.preset = 'wan2.1-vace-1.3b'
        data = dict(frames=21, height=60, width=104, text_len=512, text_dim=4096)
    cfg.train_dataloader = dict(batch_size=1, num_workers=0, sampler=dict(type='InfiniteSampler', shuffle=False),
                                collate_fn=dict(type='default_collate'),
                                dataset=dict(type='RandomVCULatents', **data))
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters)
    cfg.default_hooks.checkpoint = dict(type='VDOTCheckpointHook', interval=10**9, by_epoch=False, save_last=False)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1, log_metric_by_epoch=False)
    cfg.custom_hooks = [dict(type='StepStatsHook')]
    cfg.custom_imports = dict(imports=['gpu_check_hooks'], allow_failed_imports=False)
    cfg.log_level = 'WARNING'
    path = os.path.join(work_dir, 'train_step_check.py')
    cfg.dump(path)
    return cfg, path, data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--dry-run', action='store_true')
    parser.add_argument('--iters', type=int, default=None, help='iterations (default 6; dry 2)')
    parser.add_argument('--work-dir', default=None)
    args = parser.parse_args(argv)
    import torch
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit('train_step_check: no CUDA device (use --dry-run on a CPU machine)')
    iters = args.iters or (2 if dry else 6)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='vdot_train_step_')
    row = dict(check='train_step', setting='tiny-vace 2×8×8 fp32 ZeRO-2 (gloo)' if dry else
               '1.3B VACE 81×480×832 bf16 grad-ckpt ZeRO-2')
    try:
        cfg, path, data = build_config(dry, iters, work_dir)
        from vdot_ext.tools.plan_memory import plan
        frames, height, width = 4 * (data['frames'] - 1) + 1, 8 * data['height'], 8 * data['width']
        estimate = plan(cfg, gpus=1, frames=frames, height=height, width=width, text_len=data['text_len'],
                        zero_stage=2)
        from vdot_ext.engine.deepspeed_strategy import free_port
        os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                          MASTER_PORT=str(free_port()))
        os.environ['PYTHONPATH'] = os.pathsep.join([ROOT, HERE, os.environ.get('PYTHONPATH', '')])
        from vdot_ext.tools.train import main as train
        train([path, '--work-dir', work_dir, '--launcher', 'none'])
        with open(os.path.join(work_dir, 'step_stats.json')) as f:
            steps = json.load(f)['steps']
    except Exception as exc:
        emit(**row, status='error', note=f'{type(exc).__name__}: {str(exc).splitlines()[0][:200]}')
        return
    timed = steps[1:] if len(steps) > 1 else steps            # iteration 0 includes the warm-up
    per_step = sum(s['seconds'] for s in timed) / len(timed)
    gen_steps = [s for s in steps[1:] if s['generator']]
    peak = steps[-1]['peak_bytes']
    memory_note = ''
    if peak is None:  # CPU: the process's peak resident set (libraries included, not comparable to the plan)
        from common import _proc_status
        peak = _proc_status('VmHWM')
        memory_note = '; CPU peak = the process\'s peak RSS'
    kinds = ', '.join(f"k{s['iter']}:{s['generator'] or '-'}/{s['critic']} "
                      f"{s['seconds']:.2f}s" for s in steps)
    emit(**row, device=device_name('cuda' if not dry else 'cpu'), seconds=per_step, peak_bytes=peak,
         plan_bytes=estimate.peak_bytes, iters=len(steps),
         generator_step_seconds=(sum(s['seconds'] for s in gen_steps) / len(gen_steps)) if gen_steps else None,
         status='ok', note=f's/step = mean of iterations 1..{len(steps) - 1}; {kinds}{memory_note}')


if __name__ == '__main__':
    main()
