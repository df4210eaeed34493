"""Worker for the DeepSpeed/LoRA tests: runs ``vdot_ext/tools/train.py``'s
``main`` (the ``mim train`` entry point) for several jobs in one process
(launched with ``python`` for ``--launcher none`` or ``torchrun`` for
``--launcher pytorch``), and provides the tiny data set and a hook that dumps
every rank's gathered weights at the end of a run.

    python tests/_deepspeed_worker.py JOBS.json      # JOBS = [[argv...], ...]
"""
import json
import os
import sys

import torch
from mmengine.hooks import Hook
from torch.utils.data import Dataset

from vdot_ext.registry import DATASETS, HOOKS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@DATASETS.register_module(force=True)
class RandomLatentVCUs(Dataset):
    """Batches shaped like the distiller's: context [L, 32], latents
    [16, F, 8, 8], vace_context [96, F, 8, 8]; sample i is a function of
    (seed, i) only, so skipping data on resume reproduces the same stream."""

    def __init__(self, num_samples=64, frames=2, size=8, text_len=6, seed=0):
        self.n, self.f, self.s, self.l, self.seed = num_samples, frames, size, text_len, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        return dict(context=torch.randn(self.l, 32, generator=g),
                    latents=torch.randn(16, self.f, self.s, self.s, generator=g),
                    vace_context=torch.randn(96, self.f, self.s, self.s, generator=g))


@HOOKS.register_module(force=True)
class DumpWeightsHook(Hook):
    """After training: every rank writes its gathered model weights, the
    exit steps it used and (LoRA) the live merged generator to
    ``<work_dir>/<name>_rank<r>.pt``."""

    priority = 'VERY_LOW'

    def __init__(self, name='final'):
        self.name = name

    def after_train(self, runner):
        from vdot_ext.models.lora import has_lora, merged_state_dict
        model = runner.model
        strategy = getattr(runner, 'strategy', None)
        if strategy is not None and hasattr(strategy, 'consolidated_state_dict'):
            sd = strategy.consolidated_state_dict()
        else:
            sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        out = dict(state_dict=sd, iteration=int(model.iteration),
                   exit_steps=[model.exit_step(p.iteration) for p in model.schedule_trace],
                   world_size=runner.world_size)
        if has_lora(model.generator):
            out['merged_generator'] = merged_state_dict(model.generator)
        torch.save(out, os.path.join(runner.work_dir, f'{self.name}_rank{runner.rank}.pt'))


def tiny_config(path, zero_stage=2, max_iters=4, lora=False, checkpoint_interval=4,
                strategy=True, ema=False, precision=None):
    """Write a tiny distiller config (VACE-tiny roles, register-token GAN,
    DMD; OTD off so the test does not depend on the OT solver)."""
    lora_line = ("generator_lora=dict(type='LoRAAdapter', rank=4, alpha=8),"
                 if lora else '')
    ds = ''
    if strategy:
        extra = f", {precision}=dict(enabled=True)" if precision else ''
        ds = (f"strategy = dict(type='RoleDeepSpeedStrategy', config=dict("
              f"zero_optimization=dict(stage={zero_stage}){extra}))\n")
    ema_hook = ("dict(type='GeneratorEMAHook', decay=0.5),\n    " if ema else '')
    text = f"""
default_scope = 'vdot_ext'
custom_imports = dict(imports=['_deepspeed_worker'], allow_failed_imports=False)
model = dict(
    type='VDOTDistiller',
    real_score=dict(type='WanVACEScore', preset='tiny-vace'),
    discriminator=dict(type='RegisterTokenDiscriminator', taps=(1, 3), bottleneck_dim=24,
                       num_heads=2, use_time_emb=True),
    otd_loss=None, dmd_loss=dict(type='DMDLoss'),
    gan_loss=dict(type='RelativisticGANLoss', loss_weight=0.1),
    {lora_line}
    gen_every=2, guidance_scale=2.0, uncond='zeros', seed=3)
train_dataloader = dict(batch_size=1, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        collate_fn=dict(type='default_collate'),
                        dataset=dict(type='RandomLatentVCUs'))
train_cfg = dict(type='IterBasedTrainLoop', max_iters={max_iters})
optim_wrapper = dict(
    constructor='RoleOptimWrapperConstructor',
    generator=dict(type='OptimWrapper', clip_grad=dict(max_norm=1.0),
                   optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0)),
    critic=dict(type='OptimWrapper', clip_grad=dict(max_norm=1.0),
                optimizer=dict(type='AdamW', lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0)))
{ds}
env_cfg = dict(dist_cfg=dict(backend='gloo'))
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', interval={checkpoint_interval}, by_epoch=False))
custom_hooks = [{ema_hook}dict(type='DumpWeightsHook')]
log_processor = dict(by_epoch=False)
log_level = 'WARNING'
randomness = dict(seed=0, diff_rank_seed=True)
"""
    with open(path, 'w') as f:
        f.write(text)
    return path


def main(jobs_file):
    sys.path.insert(0, ROOT)
    from vdot_ext.tools.train import main as train_main
    with open(jobs_file) as f:
        jobs = json.load(f)
    for argv in jobs:
        train_main(argv)


if __name__ == '__main__':
    main(sys.argv[1])
