"""Registry entries the train-step check's config imports (``custom_imports``): random
encoded VCU batches at a given geometry and a hook that times each iteration."""
import json
import os
import time

import torch
from mmengine.hooks import Hook
from torch.utils.data import Dataset

from vdot_ext.registry import DATASETS, HOOKS


@DATASETS.register_module(force=True)
class RandomVCULatents(Dataset):
    """What ``VCUManifestDataset`` yields after encoding, with random values:
    ``context`` [L, text_dim], ``negative_context`` (zeros), ``latents`` [16, F, h, w],
    ``vace_context`` [96, F, h, w]. Sample i depends on (seed, i) only."""

    def __init__(self, frames=21, height=60, width=104, text_len=512, text_dim=4096, num_samples=64, seed=0):
        self.shape = (frames, height, width)
        self.text = (text_len, text_dim)
        self.n, self.seed = num_samples, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        context = torch.randn(*self.text, generator=g)
        return dict(context=context, negative_context=torch.zeros_like(context),
                    latents=torch.randn(16, *self.shape, generator=g),
                    vace_context=torch.randn(96, *self.shape, generator=g), index=i)


@HOOKS.register_module(force=True)
class StepStatsHook(Hook):
    """Seconds of every iteration (CUDA synchronised), which roles stepped, and the
    peak memory, written to ``<work_dir>/step_stats.json`` after training."""

    priority = 'VERY_LOW'

    def __init__(self, out='step_stats.json'):
        self.out = out
        self.steps = []

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before_train(self, runner):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._sync()
        self._start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._sync()
        from vdot_ext.utils import unwrap_model
        model = unwrap_model(runner.model)
        plan = model.plan(runner.iter) if hasattr(model, 'plan') else None
        self.steps.append(dict(iter=runner.iter, seconds=time.perf_counter() - self._start,
                               generator=getattr(plan, 'generator', None), critic=getattr(plan, 'critic', None),
                               peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None))

    def after_train(self, runner):
        with open(os.path.join(runner.work_dir, self.out), 'w') as f:
            json.dump(dict(steps=self.steps), f, indent=1)
