"""The stage hand-off: every training run ends by writing its generator as one
consolidated model in the Wan2.1 release layout (docs/DESIGN.md §7, §8).

``ExportGeneratorHook`` runs at ``after_train`` on every rank (gathering ZeRO-3
partitions is a collective) and calls :func:`vdot_ext.apis.export.export_generator`,
which gathers one output shard at a time and lets rank 0 write::

    <work_dir>/export/        diffusion_pytorch_model-0000k-of-0000n.safetensors + index,
                              config.json, vdot_student.json (release key layout)

The folder is what stage 2 reads (``model.generator_init.source=<stage-1 work_dir>/export``),
what ``python -m vdot_ext.tools.infer --ckpt`` reads, and what diffsynth / the VACE
scripts load like an official release.

With an EMA of the generator (``GeneratorEMAHook``) both weights are written and
``use_ema`` says which one is ``export/``:

=============  =====================  ============================
``use_ema``    ``export/``            the other folder
=============  =====================  ============================
True (default) the EMA weights        ``export_raw/``: the trained weights
False          the trained weights    ``export_ema/``: the EMA weights
=============  =====================  ============================

``vdot_student.json`` of each folder records which one it holds (``"ema"``).

Memory: the live weights are gathered shard by shard (``max_shard_size``); the EMA
tensors are gathered one at a time from the EMA hook's per-rank shards as each
output shard is built, so no rank holds a full copy of either.
"""
import os.path as osp
from collections.abc import Mapping
from typing import Dict, Iterator, Optional, Union

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from vdot_ext.registry import HOOKS
from vdot_ext.utils import unwrap_model

from .ema import GeneratorEMAHook

RAW_SUFFIX = '_raw'
EMA_SUFFIX = '_ema'


class _GatheredEMA(Mapping):
    """The EMA hook's tensors by the module's parameter names, each gathered
    into a full tensor only when read (``all_gather`` of the ZeRO-3 shards: every
    rank reads the same names in the same order, as ``export_generator`` does)."""

    def __init__(self, hook: GeneratorEMAHook):
        self._index = {name: i for i, name in enumerate(hook.names)}
        self._hook = hook

    def __getitem__(self, name: str) -> torch.Tensor:
        i = self._index[name]
        return self._hook._gather_full(self._hook.params[i], self._hook.shards[i])

    def __contains__(self, name) -> bool:   # Mapping's default would read (gather) the tensor
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@HOOKS.register_module()
class ExportGeneratorHook(Hook):
    """Write ``model.<module>`` to ``<work_dir>/<out_dir>`` at the end of training.

    Args:
        module: the model attribute to export (the distiller's ``generator``).
            A model without it (e.g. ``FlowMatchingPretrainer``) exports nothing,
            with a log line saying so.
        out_dir: folder name under the work dir (or an absolute path).
        use_ema: with an EMA of ``module`` on, whether ``out_dir`` holds the EMA
            weights (``out_dir + '_raw'`` the trained ones) or the trained weights
            (``out_dir + '_ema'`` the EMA). Ignored without an EMA hook.
        max_shard_size: bytes per safetensors shard (``'5GB'``, ``'500MiB'``, int).
        dtype: cast floating tensors (``'bf16'``, ``'fp32'``); default: as trained
            (bf16 under DeepSpeed bf16).
    """

    # after GeneratorEMAHook (ABOVE_NORMAL) and LossCurveHook (LOW) at after_train
    priority = 'VERY_LOW'

    def __init__(self, module: str = 'generator', out_dir: str = 'export', use_ema: bool = True,
                 max_shard_size: Union[int, str] = '5GB', dtype: Optional[str] = None):
        from vdot_ext.apis.export import as_dtype, parse_size
        if not out_dir:
            raise ValueError('ExportGeneratorHook.out_dir: give a folder name, e.g. "export"')
        parse_size(max_shard_size, 'ExportGeneratorHook.max_shard_size')
        as_dtype(dtype, 'ExportGeneratorHook.dtype')
        self.module = module
        self.out_dir = out_dir
        self.use_ema = bool(use_ema)
        self.max_shard_size = max_shard_size
        self.dtype = dtype
        self.written: Dict[str, str] = {}   # 'ema' / 'raw' -> folder (rank 0)

    def _ema_hook(self, runner) -> Optional[GeneratorEMAHook]:
        found = [h for h in runner.hooks if isinstance(h, GeneratorEMAHook) and h.module_name == self.module]
        if len(found) > 1:
            raise ValueError(f'ExportGeneratorHook: {len(found)} GeneratorEMAHooks average model.{self.module}; '
                             'keep one')
        return found[0] if found else None

    @staticmethod
    def _sampler(runner, model) -> dict:
        """The student's few-step sampler for ``vdot_student.json``: the config's
        ``generator_timesteps``/``generator_shift`` (else the defaults, 4 steps,
        shift 5) when they give the model's own warped steps; otherwise those
        steps as they are (shift 1 leaves them unchanged)."""
        from vdot_ext.apis.export import DEFAULT_SAMPLER
        from vdot_ext.models.flow_matching import few_step_timesteps
        steps = getattr(model, 'generator_timesteps', None)
        model_cfg = (getattr(runner, 'cfg', None) or {}).get('model') or {}
        given = dict(DEFAULT_SAMPLER)
        if model_cfg.get('generator_timesteps') is not None:
            given['timesteps'] = [float(t) for t in model_cfg['generator_timesteps']]
        if model_cfg.get('generator_shift') is not None:
            given['shift'] = float(model_cfg['generator_shift'])
        if not isinstance(steps, torch.Tensor):
            return given
        warped = few_step_timesteps(given['timesteps'], given['shift'])
        if warped.shape == steps.shape and torch.allclose(warped.double(), steps.double().cpu(), atol=1e-3):
            return given
        return dict(DEFAULT_SAMPLER, timesteps=[float(t) for t in steps.double().cpu()], shift=1.0)

    def folders(self, work_dir: str, with_ema: bool) -> Dict[str, str]:
        """``{'raw': folder, 'ema': folder}`` (only ``raw`` without EMA)."""
        main = self.out_dir if osp.isabs(self.out_dir) else osp.join(work_dir, self.out_dir)
        if not with_ema:
            return dict(raw=main)
        if self.use_ema:
            return dict(ema=main, raw=main + RAW_SUFFIX)
        return dict(raw=main, ema=main + EMA_SUFFIX)

    def after_train(self, runner) -> None:
        from vdot_ext.apis.export import export_generator
        model = unwrap_model(runner.model)
        generator = getattr(model, self.module, None)
        if not isinstance(generator, torch.nn.Module):
            print_log(f'ExportGeneratorHook: {type(model).__name__} has no model.{self.module}; nothing exported',
                      logger='current')
            return
        ema_hook = self._ema_hook(runner)
        with_ema = ema_hook is not None and ema_hook.steps > 0
        if ema_hook is not None and not with_ema:
            print_log(f'ExportGeneratorHook: the EMA of model.{self.module} never updated (0 generator steps); '
                      'exporting the trained weights only', logger='current')
        sampler = self._sampler(runner, model)
        provenance = dict(iteration=int(runner.iter), work_dir=osp.abspath(runner.work_dir),
                          experiment=getattr(runner, 'experiment_name', None), module=self.module,
                          config=getattr(getattr(runner, 'cfg', None), 'filename', None))
        for kind, folder in self.folders(runner.work_dir, with_ema).items():
            ema = kind == 'ema'
            extra = dict(momentum=ema_hook.momentum, ema_steps=ema_hook.steps) if ema else {}
            # every rank: the ZeRO-3 gathers (and EMA all-gathers) are collectives; rank 0 writes
            result = export_generator(generator, folder, max_shard_size=self.max_shard_size, dtype=self.dtype,
                                      ema=ema, ema_state_dict=_GatheredEMA(ema_hook) if ema else None,
                                      sampler=sampler, provenance=dict(provenance, **extra), overwrite=True)
            if result is not None:
                self.written[kind] = result.out_dir
                print_log(f'ExportGeneratorHook: model.{self.module} ({"EMA" if ema else "trained"} weights, '
                          f'iteration {runner.iter}) -> {result.out_dir} [{len(result.shards)} shard(s), '
                          f'{result.total_bytes / 1e6:.1f} MB, {result.config["_class_name"]}]', logger='current')
