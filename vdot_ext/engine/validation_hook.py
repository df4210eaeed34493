"""Validation while training: sample videos and condition-fidelity metrics every N iterations
(docs/DESIGN.md §7), so that a run is not blind until its evaluation stage.

Every ``interval`` iterations (and at the start and the end of the run) rank 0 samples the student on
the same held-out VCUs from the same seeded noise, decodes the latents, measures the task metrics of
``vdot_ext.evaluation.condition_fidelity`` and writes

* ``<work_dir>/validation/iter_<k>/<task>_<index>.mp4``: condition | mask | real | student;
* ``<work_dir>/validation/iter_<k>/frames.png``: a strip of student frames per sample;
* ``<work_dir>/validation/iter_<k>/metrics.json``: per-task means and the per-sample values;

and sends the metrics (``add_scalars``) and the frame strip (``add_image``) to mmengine's visualizer,
whose backends (local files, TensorBoard, W&B) are the run's own. The folder ``iter_<k>`` appears
whole or not at all: it is written under a temporary name and renamed.

Validation never changes the training run (docs/DESIGN.md §11, exact resume): every global RNG stream
is saved before and restored after (:func:`vdot_ext.utils.get_rng_state`), its own noise comes from
generators seeded by ``(seed, sample index)``, the modules' train/eval modes are restored and no
gradient is taken. A run with the hook ends with the same weights, bit for bit, as one without it.

The sampling helpers (:func:`held_out_indices`, :func:`sample_noise`, :func:`student_latents`,
:func:`teacher_latents`) are shared with ``vdot_ext.tools.ablate`` (quality vs sampling steps).
"""
import os
import os.path as osp
import shutil
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from vdot_ext.registry import DATASETS, HOOKS
from vdot_ext.utils import get_rng_state, is_main_process, set_rng_state, unwrap_model, write_json

VALIDATION_DIR = 'validation'
METRICS_FILE = 'metrics.json'
STRIP_FILE = 'frames.png'
# per-sample seeds: sample i of a validation seeded s draws its initial noise from s·P + i and its
# re-noising (the few-step sampler's fresh noise between steps) from s·P + i + P/2
_SEED_STRIDE = 1_000_003


def held_out_indices(dataset, samples_per_task: int) -> List[Tuple[str, int]]:
    """``(task, index)`` of the first ``samples_per_task`` samples of each task, in index order (the
    rule of the demo's ``evaluate_vdot``), sorted by task."""
    if samples_per_task < 1:
        raise ValueError(f'samples_per_task must be >= 1, got {samples_per_task}')
    per_task: Dict[str, List[int]] = defaultdict(list)
    for index in range(len(dataset)):
        task = dataset.sample_tasks[index] if hasattr(dataset, 'sample_tasks') else dataset[index]['task']
        if len(per_task[task]) < samples_per_task:
            per_task[task].append(index)
    return [(task, index) for task in sorted(per_task) for index in per_task[task]]


def sample_noise(shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    """The initial noise of held-out sample ``index``: a function of ``(seed, index)`` only, so every
    model and every step count sees the same noise for the same sample."""
    g = torch.Generator().manual_seed(int(seed) * _SEED_STRIDE + int(index))
    return torch.randn(tuple(shape), generator=g)


def renoise_seed(seed: int, index: int) -> int:
    """Seed of the global torch RNG while sample ``index`` is generated (the few-step sampler draws
    its between-step noise from it)."""
    return int(seed) * _SEED_STRIDE + int(index) + _SEED_STRIDE // 2


def uniform_few_step_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """``num_steps`` generator timesteps ``1000·(1 − i/n)``, i < n, warped by ``shift``
    (docs/DESIGN.md §4): n = 4 gives the default ``[1000, 750, 500, 250]`` → ``[1000, 937.5, 833.3, 625]``."""
    from vdot_ext.models.flow_matching import few_step_timesteps
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    grid = torch.linspace(1000.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return few_step_timesteps(grid.tolist(), shift)


def _batch_of(item: dict, distiller) -> dict:
    vace = item.get('vace_context')
    batch = dict(context=item['context'][None],
                 vace_context=vace[None] if (vace is not None and distiller.use_vace_context) else None)
    if item.get('negative_context') is not None:
        batch['negative_context'] = item['negative_context'][None]
    return batch


@torch.no_grad()
def student_latents(distiller, item: dict, noise: torch.Tensor, rng_seed: int,
                    timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distiller's few-step sample of ``item`` from ``noise`` ([1, C, F, h, w]).

    ``timesteps`` replaces the generator's steps for this call (e.g. :func:`uniform_few_step_timesteps`);
    None keeps its own. The global torch RNG is seeded with ``rng_seed`` (the sampler's re-noising);
    callers that must not disturb it save and restore it around the call.
    """
    batch = _batch_of(item, distiller)
    saved = distiller.generator_timesteps
    if timesteps is not None:
        distiller.generator_timesteps = timesteps.to(saved.device, saved.dtype)
    try:
        torch.manual_seed(rng_seed)
        return distiller.generate(batch['context'], batch['vace_context'], noise=noise).float()
    finally:
        distiller.generator_timesteps = saved


@torch.no_grad()
def teacher_latents(distiller, item: dict, noise: torch.Tensor, num_steps: int, shift: float = 5.0,
                    guidance_scale: Optional[float] = None) -> torch.Tensor:
    """The teacher's Euler sample of ``item`` with CFG, the unconditional branch as the distiller
    builds it for training (``uncond``: Wan's negative prompt from the data, or zeros)."""
    from vdot_ext.models.samplers import euler_sample
    batch = _batch_of(item, distiller)
    guidance = distiller.guidance_scale if guidance_scale is None else guidance_scale
    negative = None
    if guidance != 1.0:
        if distiller.guidance_scale == 1.0:
            raise ValueError('teacher_latents: guidance_scale != 1 for a distiller trained without CFG '
                             '(model.guidance_scale = 1): its unconditional branch is not defined')
        negative = distiller._negative_context(batch)
    return euler_sample(distiller.real_score, noise, batch['context'], batch['vace_context'], num_steps,
                        shift, guidance, negative).float()


def decode(vae, latents: torch.Tensor, num_ref: int) -> torch.Tensor:
    """[1, 16, F, h, w] latents → [3, T, H, W] pixels in [-1, 1], reference frames dropped."""
    return vae.decode(latents[:, :, num_ref:].float())[0].clamp(-1, 1)


def mean_metrics(per_sample: List[dict]) -> Dict[str, Dict[str, float]]:
    """``{task: {metric: mean over samples}}`` of ``[dict(task=..., metrics={...})]``."""
    values: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for record in per_sample:
        for metric, value in record['metrics'].items():
            values[record['task']][metric].append(float(value))
    return {task: {m: float(np.mean(v)) for m, v in sorted(metrics.items())}
            for task, metrics in sorted(values.items())}


@HOOKS.register_module()
class ValidationHook(Hook):
    """Samples and condition-fidelity metrics of the student every ``interval`` iterations (see the
    module docstring). Rank 0 only; ZeRO-3-partitioned generators are refused (the generator would have
    to be gathered on every rank).

    Args:
        dataset: config of the held-out dataset (``get_pixels(index)`` and ``sample_tasks``, e.g. the
            demo's ``SyntheticVideoDataset`` under another seed).
        vae_checkpoint: the ``TinyWanVAE`` that decodes latents.
        interval: validation period in iterations.
        samples_per_task: held-out samples per task (the first of each task in index order).
        seed: noise seed; sample i always gets the noise of ``(seed, i)``.
        at_start: validate before the first iteration of a fresh run (iteration 0: the initialisation).
        fps: of the written mp4s.
        strip_frames: student frames per sample in ``frames.png``.
        scalar_prefix: prefix of the names sent to the visualizer (``val/<task>/<metric>``).
        image_name: the visualizer's image name (no '/': the local backend writes ``<name>_<k>.png``).
    """

    priority = 'LOW'

    def __init__(self, dataset: dict, vae_checkpoint: str, interval: int = 200, samples_per_task: int = 2,
                 seed: int = 1234, at_start: bool = True, fps: int = 8, strip_frames: int = 4,
                 scalar_prefix: str = 'val/', image_name: str = 'validation_frames'):
        if int(interval) < 1:
            raise ValueError(f'ValidationHook.interval must be >= 1, got {interval}')
        if '/' in image_name:
            raise ValueError(f"ValidationHook.image_name {image_name!r}: no '/' (mmengine's local backend "
                             'writes <name>_<step>.png into one folder)')
        self.dataset_cfg = dataset
        self.vae_checkpoint = vae_checkpoint
        self.interval = int(interval)
        self.samples_per_task = int(samples_per_task)
        self.seed = int(seed)
        self.at_start = bool(at_start)
        self.fps = int(fps)
        self.strip_frames = int(strip_frames)
        self.scalar_prefix = scalar_prefix
        self.image_name = image_name
        self._data = None
        self._vae = None
        self._indices: List[Tuple[str, int]] = []
        self._real_metrics: Dict[int, dict] = {}
        self.last_validated: Optional[int] = None

    # -- mmengine hook points -------------------------------------------------
    def before_train(self, runner) -> None:
        from vdot_ext.utils.zero import is_partitioned
        model = unwrap_model(runner.model)
        if not hasattr(model, 'generate'):
            raise TypeError(f'ValidationHook: the model {type(model).__name__} has no generate() '
                            '(a VDOTDistiller is expected)')
        if any(is_partitioned(p) for p in model.generator.parameters()):
            raise RuntimeError('ValidationHook: the generator is ZeRO-3 partitioned; validation samples on '
                               'rank 0 alone and cannot gather it. Remove the hook from custom_hooks or use '
                               'ZeRO stage <= 2 for the generator')
        self.last_validated = None
        if self.at_start and runner.iter == 0:
            self.validate(runner, 0)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval):
            self.validate(runner, runner.iter + 1)

    def after_train(self, runner) -> None:
        if self.last_validated != runner.iter:
            self.validate(runner, runner.iter)

    # -- validation -------------------------------------------------------------
    def validate(self, runner, iteration: int) -> Optional[dict]:
        """Sample, measure and write iteration ``iteration``'s validation (rank 0; others return None)."""
        self.last_validated = iteration
        if not is_main_process():
            return None
        model = unwrap_model(runner.model)
        rng = get_rng_state()
        modes = {name: module.training for name, module in model.named_modules()}
        try:
            model.eval()
            with torch.no_grad():
                summary, videos, strip = self._measure(model, iteration)
        finally:
            for name, module in model.named_modules():
                module.training = modes[name]
            set_rng_state(rng)
        folder = self._write(runner.work_dir, iteration, summary, videos, strip)
        scalars = {f'{self.scalar_prefix}{task}/{metric}': value
                   for task, metrics in summary['metrics'].items() for metric, value in metrics.items()}
        runner.visualizer.add_scalars(scalars, step=iteration)
        runner.visualizer.add_image(self.image_name, strip, step=iteration)
        text = ', '.join(f'{k[len(self.scalar_prefix):]}={v:.4g}' for k, v in scalars.items())
        print_log(f'ValidationHook: iteration {iteration}: {text} ({folder})', logger='current')
        return summary

    def _setup(self) -> None:
        from vdot_ext.models.tiny_codecs import TinyWanVAE
        if self._data is None:
            self._data = DATASETS.build(self.dataset_cfg)
            self._indices = held_out_indices(self._data, self.samples_per_task)
        if self._vae is None:
            self._vae = TinyWanVAE.load(self.vae_checkpoint)

    def _measure(self, model, iteration: int):
        from vdot_ext.evaluation.condition_fidelity import condition_fidelity
        self._setup()
        per_sample, videos, rows = [], [], []
        for task, index in self._indices:
            item = self._data[index]
            pixels = self._data.get_pixels(index)
            noise = sample_noise((1, ) + tuple(item['latents'].shape), self.seed, index)
            latents = student_latents(model, item, noise, renoise_seed(self.seed, index))
            video = decode(self._vae, latents, int(item.get('num_ref', 0)))
            if index not in self._real_metrics:
                self._real_metrics[index] = condition_fidelity(task, pixels['video'], pixels)
            metrics = condition_fidelity(task, video, pixels)
            per_sample.append(dict(task=task, index=index, sample_id=pixels.get('sample_id'),
                                   metrics={k: float(v) for k, v in metrics.items()},
                                   real_metrics={k: float(v) for k, v in self._real_metrics[index].items()}))
            videos.append((f'{task}_{index:04d}.mp4', pixels, video))
            rows.append(self._strip_row(pixels['video'], video))
        strip = np.concatenate(rows, axis=0) if rows else np.zeros((2, 2, 3), np.uint8)
        summary = dict(iteration=iteration, metrics=mean_metrics(per_sample),
                       real_metrics=mean_metrics([dict(task=r['task'], metrics=r['real_metrics'])
                                                  for r in per_sample]),
                       samples=len(per_sample), samples_per_task=self.samples_per_task, seed=self.seed,
                       student_steps=len(model.generator_timesteps), per_sample=per_sample)
        return summary, videos, strip

    def _strip_row(self, real: torch.Tensor, student: torch.Tensor) -> np.ndarray:
        """One sample's row: the real middle frame, then ``strip_frames`` student frames evenly in time."""
        from vdot_ext.data.video_io import video_to_uint8
        frames = student.shape[1]
        picks = np.linspace(0, frames - 1, max(self.strip_frames, 1)).round().astype(int)
        real_u8 = video_to_uint8(real[:, [frames // 2]])[0]
        student_u8 = video_to_uint8(student[:, picks.tolist()])
        gap = np.full((real_u8.shape[0], 2, 3), 255, np.uint8)
        return np.concatenate([real_u8, gap] + [np.concatenate([f, gap], axis=1) for f in student_u8], axis=1)

    def _write(self, work_dir: str, iteration: int, summary: dict, videos, strip: np.ndarray) -> str:
        """Write ``validation/iter_<k>/`` under a temporary name, then rename it into place (a previous
        folder of the same iteration, from an interrupted run, is replaced)."""
        from vdot_ext.data.video_io import mask_to_video, side_by_side, write_mp4, write_png
        root = osp.join(work_dir, VALIDATION_DIR)
        final = osp.join(root, f'iter_{iteration}')
        tmp = osp.join(root, f'.iter_{iteration}.tmp{os.getpid()}')
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            for name, pixels, video in videos:
                condition = pixels['frames'] if pixels.get('ref_images') is None else pixels['ref_images']
                panels = [condition, mask_to_video(pixels['masks']), pixels['video'], video]
                write_mp4(osp.join(tmp, name), side_by_side(panels, ['condition', 'mask', 'real', 'student']),
                          fps=self.fps)
            write_png(osp.join(tmp, STRIP_FILE), strip)
            write_json(osp.join(tmp, METRICS_FILE), summary, indent=2)
            old = None
            if osp.exists(final):
                old = osp.join(root, f'.iter_{iteration}.old{os.getpid()}')
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


def read_validation_history(work_dir: str) -> Dict[int, dict]:
    """``{iteration: metrics.json}`` of every ``validation/iter_<k>`` folder of a training work dir."""
    root = osp.join(work_dir, VALIDATION_DIR)
    history = {}
    if not osp.isdir(root):
        return history
    import json
    for name in os.listdir(root):
        path = osp.join(root, name, METRICS_FILE)
        if name.startswith('iter_') and name[5:].isdigit() and osp.isfile(path):
            with open(path) as f:
                history[int(name[5:])] = json.load(f)
    return dict(sorted(history.items()))
