"""Teacher-vs-student samples and condition-fidelity metrics (the demo's last stage).

Every compared model sees, per held-out sample, the same VCU and the same
initial noise, drawn by ``validation_hook.sample_noise`` from a local
``torch.Generator`` seeded with ``seed · 1_000_003 + index``: it does not depend
on the models' step counts, on how many samples are evaluated or on the global
RNG. The student's sampler re-noises between its steps from the global RNG;
it is seeded per sample (``validation_hook.renoise_seed``) and the caller's RNG
state is restored afterwards. These are the rules of the ``ValidationHook`` and
of ``tools.ablate``'s quality-vs-steps curves, so their numbers agree.

Rows (``metrics.json`` prefixes): ``real`` (the real video, the upper bound),
``codec`` (the real video's latents decoded: the bound of any latent model),
``teacher`` (many Euler steps, CFG), ``teacher_few`` (the same sampler with the
student's number of steps), ``student`` (the distilled few-step generator).
Each metric is reported as mean ± standard error over the task's samples
(SE = s/√n, s the sample standard deviation); student − teacher differences
are paired per sample (same noise, same VCU) and reported the same way.
"""
import inspect
import math
import os
import os.path as osp
import time
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Sequence

from mmengine.logging import print_log

from vdot_ext.registry import DATASETS, FUNCTIONS, MODELS
from vdot_ext.utils import write_json

ROWS = ('real', 'codec', 'teacher', 'teacher_few', 'student')
# paired differences reported per metric: (minuend, subtrahend)
PAIRS = (('student', 'teacher_few'), ('student', 'teacher'), ('teacher', 'codec'))


def mean_se(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``dict(mean, se, n)``: SE = s/√n with the sample standard deviation s (n − 1);
    ``se`` is None for n < 2 or when a value is not finite (e.g. PSNR ∞ of an exact copy)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return dict(mean=None, se=None, n=0)
    mean = sum(values) / n
    if n < 2 or not all(math.isfinite(v) for v in values):
        return dict(mean=mean, se=None, n=n)
    var = sum((v - mean)**2 for v in values) / (n - 1)
    return dict(mean=mean, se=math.sqrt(var / n), n=n)


def _fmt(stat: Optional[dict]) -> str:
    if not stat or stat.get('mean') is None:
        return '-'
    mean, se = stat['mean'], stat['se']
    digits = 1 if abs(mean) >= 10 or not math.isfinite(mean) else 3
    text = f'{mean:.{digits}f}'
    return text if se is None else f'{text} ± {se:.{digits}f}'


def metrics_table(summary: dict) -> str:
    """A markdown table of ``summary['stats']``: one line per (task, metric), mean ± SE per row,
    then the paired student − teacher differences."""
    rows = [r for r in ROWS if any(r in per for t in summary['stats'].values() for per in t.values())]
    steps = dict(teacher=summary['teacher_steps'], teacher_few=summary['teacher_few_steps'],
                 student=summary['student_steps'])
    heads = [f'{r} ({steps[r]} steps)' if r in steps else r for r in rows]
    diffs = [f'{a} − {b}' for a, b in PAIRS[:2]]
    lines = ['| task | metric | n | ' + ' | '.join(heads + diffs) + ' |',
             '|' + '---|' * (3 + len(heads) + len(diffs))]
    for task, per_metric in summary['stats'].items():
        for metric, per_row in per_metric.items():
            n = max((s['n'] for s in per_row.values()), default=0)
            cells = [_fmt(per_row.get(r)) for r in rows]
            cells += [_fmt(summary['paired_differences'].get(task, {}).get(metric, {}).get(f'{a}-{b}'))
                      for a, b in PAIRS[:2]]
            lines.append(f'| {task} | {metric} | {n} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def evaluation_settings(call) -> dict:
    """The arguments ``evaluate_vdot`` runs with for a stage ``call``: the call's values over the
    function's defaults. The tools that repeat part of the evaluation (``ablate``'s quality-vs-steps
    curves, ``make_demo_assets``' teacher check) read noise seed, shift and sample count from here, so
    they cannot drift from it."""
    defaults = {k: p.default for k, p in inspect.signature(evaluate_vdot).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return dict(defaults, **{k: v for k, v in dict(call).items() if k != 'type'})


@FUNCTIONS.register_module()
def evaluate_vdot(work_dir: str,
                  model: dict,
                  checkpoint: str,
                  dataset: dict,
                  vae_checkpoint: str,
                  samples_per_task: int = 24,
                  teacher_steps: int = 40,
                  teacher_few_steps: Optional[int] = None,
                  teacher_shift: float = 5.0,
                  teacher_guidance: Optional[float] = None,
                  videos_per_task: int = 2,
                  seed: int = 1234,
                  fps: int = 8) -> Dict[str, object]:
    """Sample the teacher (``teacher_steps`` and ``teacher_few_steps`` Euler
    steps) and the student (its few steps) from the same noise and the same
    VCU, decode them, and measure how well each keeps the condition
    (``condition_fidelity``, per task); see the module doc.

    Writes ``<work_dir>/metrics.json`` (per task: ``metrics`` means,
    ``standard_errors``, ``stats`` {metric: {row: {mean, se, n}}},
    ``paired_differences``), ``<work_dir>/metrics.md`` (the printed table) and,
    for the first ``videos_per_task`` samples of each task,
    ``<work_dir>/samples/<task>_<index>.mp4`` (condition | mask | real |
    teacher | teacher few | student, side by side).

    Args:
        model: the ``VDOTDistiller`` config of the trained stage.
        checkpoint: its final weights (``final_model.pth``).
        dataset: a dataset config with ``get_pixels(index)`` (held-out data);
            it must hold ``samples_per_task`` samples of every task.
        vae_checkpoint: the ``TinyWanVAE`` used to decode latents.
        teacher_few_steps: the teacher's steps in the ``teacher_few`` row
            (default: the student's step count).
        teacher_guidance: teacher CFG scale (default: the distiller's).
    """
    from vdot_ext.data.video_io import mask_to_video, side_by_side, write_mp4
    from vdot_ext.engine.validation_hook import (
        decode,
        held_out_indices,
        renoise_seed,
        sample_noise,
        student_latents,
        teacher_latents,
    )
    from vdot_ext.evaluation.condition_fidelity import condition_fidelity
    from vdot_ext.models.tiny_codecs import TinyWanVAE
    from vdot_ext.models.weights import load_weights
    from vdot_ext.utils import get_rng_state, set_rng_state

    os.makedirs(osp.join(work_dir, 'samples'), exist_ok=True)
    rng = get_rng_state()  # building and sampling draw from it; the caller's state is restored
    distiller = MODELS.build(model)
    load_weights(distiller, checkpoint, field='evaluate.checkpoint')
    distiller.eval()
    data = DATASETS.build(dataset)
    vae = TinyWanVAE.load(vae_checkpoint)
    guidance = distiller.guidance_scale if teacher_guidance is None else teacher_guidance
    student_steps = len(distiller.generator_timesteps)
    few_steps = student_steps if teacher_few_steps is None else int(teacher_few_steps)

    per_task: Dict[str, List[int]] = defaultdict(list)
    for task, index in held_out_indices(data, samples_per_task):
        per_task[task].append(index)
    short = {t: len(v) for t, v in per_task.items() if len(v) < samples_per_task}
    if short:
        raise ValueError(f'evaluate.dataset: {len(data)} samples hold fewer than samples_per_task='
                         f'{samples_per_task} of task(s) {short}; raise dataset.num_samples to at least '
                         f'{samples_per_task * len(per_task)}')

    values = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # task → metric → row → [v]
    latent_mse = defaultdict(list)
    timing = defaultdict(float)
    try:
        for task, indices in sorted(per_task.items()):
            for k, index in enumerate(indices):
                item = data[index]
                pixels = data.get_pixels(index)
                noise = sample_noise((1, ) + tuple(item['latents'].shape), seed, index)
                latents = {}
                for name, steps in (('teacher', teacher_steps), ('teacher_few', few_steps)):
                    start = time.perf_counter()
                    latents[name] = teacher_latents(distiller, item, noise, steps, teacher_shift, guidance)
                    timing[f'{name}_seconds'] += time.perf_counter() - start
                start = time.perf_counter()
                latents['student'] = student_latents(distiller, item, noise, renoise_seed(seed, index))
                timing['student_seconds'] += time.perf_counter() - start
                latents['codec'] = item['latents'][None].float()
                n_ref = int(item.get('num_ref', 0))
                videos = {name: decode(vae, lat, n_ref) for name, lat in latents.items()}
                videos['real'] = pixels['video']
                for name, video in videos.items():
                    for metric, value in condition_fidelity(task, video, pixels).items():
                        values[task][metric][name].append(float(value))
                for name in ('teacher', 'teacher_few'):
                    latent_mse[(task, name)].append(float((latents['student'] - latents[name]).square().mean()))
                if k < videos_per_task:
                    condition = pixels['frames'] if pixels.get('ref_images') is None else pixels['ref_images']
                    panels = [condition, mask_to_video(pixels['masks']), videos['real'], videos['teacher'],
                              videos['teacher_few'], videos['student']]
                    labels = ['condition', 'mask', 'real', f'teacher {teacher_steps}', f'teacher {few_steps}',
                              f'student {student_steps}']
                    write_mp4(osp.join(work_dir, 'samples', f'{task}_{index:04d}.mp4'),
                              side_by_side(panels, labels), fps=fps)
    finally:
        set_rng_state(rng)

    n = sum(len(v) for v in per_task.values())
    stats, means, errors, paired = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
    for task in sorted(values):
        stats[task], means[task], errors[task], paired[task] = OrderedDict(), {}, {}, OrderedDict()
        for metric in sorted(values[task]):
            per_row = values[task][metric]
            stats[task][metric] = OrderedDict((row, mean_se(per_row[row])) for row in ROWS if row in per_row)
            for row, stat in stats[task][metric].items():
                means[task][f'{row}/{metric}'] = stat['mean']
                errors[task][f'{row}/{metric}'] = stat['se']
            paired[task][metric] = OrderedDict(
                (f'{a}-{b}', mean_se([x - y for x, y in zip(per_row[a], per_row[b])]))
                for a, b in PAIRS if a in per_row and b in per_row)
        for name in ('teacher', 'teacher_few'):
            stat = mean_se(latent_mse[(task, name)])
            means[task][f'student_{name}_latent_mse'] = stat['mean']
            errors[task][f'student_{name}_latent_mse'] = stat['se']
    summary = dict(
        metrics=means, standard_errors=errors, stats=stats, paired_differences=paired,
        samples=n, samples_per_task=samples_per_task, sample_indices=dict(per_task),
        teacher_steps=teacher_steps, teacher_few_steps=few_steps, teacher_shift=teacher_shift,
        teacher_guidance=guidance, student_steps=student_steps, noise_seed=seed,
        noise_rule='validation_hook.sample_noise(shape, seed, index); re-noising: renoise_seed(seed, index)',
        teacher_seconds_per_sample=timing['teacher_seconds'] / max(n, 1),
        teacher_few_seconds_per_sample=timing['teacher_few_seconds'] / max(n, 1),
        student_seconds_per_sample=timing['student_seconds'] / max(n, 1),
        checkpoint=checkpoint)
    table = metrics_table(summary)
    path = osp.join(work_dir, 'metrics.json')
    write_json(path, summary, indent=2)
    with open(osp.join(work_dir, 'metrics.md'), 'w') as f:
        f.write(table + '\n')
    print_log(f'evaluate_vdot: {n} samples ({samples_per_task} per task), mean ± SE; metrics in {path}\n'
              + table, logger='current')
    return dict(metrics_json=path, samples_dir=osp.join(work_dir, 'samples'))
