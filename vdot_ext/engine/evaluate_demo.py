"""Teacher-vs-student samples and condition-fidelity metrics (the demo's last stage)."""
import json
import os
import os.path as osp
import time
from collections import defaultdict
from typing import Dict, Optional

import torch
from mmengine.logging import print_log

from vdot_ext.registry import DATASETS, FUNCTIONS, MODELS


@FUNCTIONS.register_module()
def evaluate_vdot(work_dir: str,
                  model: dict,
                  checkpoint: str,
                  dataset: dict,
                  vae_checkpoint: str,
                  samples_per_task: int = 2,
                  teacher_steps: int = 40,
                  teacher_shift: float = 5.0,
                  teacher_guidance: Optional[float] = None,
                  seed: int = 1234,
                  fps: int = 8) -> Dict[str, object]:
    """Sample the teacher (many Euler steps) and the student (its few steps)
    from the same noise and the same VCU, decode both, and measure how well
    each keeps the condition (``condition_fidelity``, per task).

    Writes ``<work_dir>/samples/<task>_<index>.mp4`` (condition | real |
    teacher | student, side by side) and ``<work_dir>/metrics.json``.

    Args:
        model: the ``VDOTDistiller`` config of the trained stage.
        checkpoint: its final weights (``final_model.pth``).
        dataset: a dataset config with ``get_pixels(index)`` (held-out data).
        vae_checkpoint: the ``TinyWanVAE`` used to decode latents.
        teacher_guidance: teacher CFG scale (default: the distiller's).
    """
    from vdot_ext.data.video_io import mask_to_video, side_by_side, write_mp4
    from vdot_ext.evaluation.condition_fidelity import condition_fidelity
    from vdot_ext.models.samplers import euler_sample
    from vdot_ext.models.tiny_codecs import TinyWanVAE
    from vdot_ext.models.weights import load_weights

    os.makedirs(osp.join(work_dir, 'samples'), exist_ok=True)
    distiller = MODELS.build(model)
    load_weights(distiller, checkpoint, field='evaluate.checkpoint')
    distiller.eval()
    data = DATASETS.build(dataset)
    vae = TinyWanVAE.load(vae_checkpoint)
    guidance = distiller.guidance_scale if teacher_guidance is None else teacher_guidance

    per_task = defaultdict(list)
    for index in range(len(data)):
        task = data.sample_tasks[index] if hasattr(data, 'sample_tasks') else data[index]['task']
        if len(per_task[task]) < samples_per_task:
            per_task[task].append(index)

    results, timing = defaultdict(lambda: defaultdict(list)), defaultdict(float)
    g = torch.Generator().manual_seed(seed)
    for task, indices in sorted(per_task.items()):
        for index in indices:
            item = data[index]
            pixels = data.get_pixels(index)
            context = item['context'][None]
            vace = item.get('vace_context')
            vace = vace[None] if (vace is not None and distiller.use_vace_context) else None
            noise = torch.randn((1, ) + tuple(item['latents'].shape), generator=g)
            start = time.perf_counter()
            teacher = euler_sample(distiller.real_score, noise, context, vace, teacher_steps,
                                   teacher_shift, guidance)
            timing['teacher_seconds'] += time.perf_counter() - start
            start = time.perf_counter()
            student = distiller.generate(context, vace, noise.shape, noise=noise)
            timing['student_seconds'] += time.perf_counter() - start
            n_ref = int(item.get('num_ref', 0))
            videos = {name: vae.decode(lat[:, :, n_ref:].float())[0].clamp(-1, 1)
                      for name, lat in (('teacher', teacher), ('student', student))}
            videos['real'] = pixels['video']
            for name, video in videos.items():
                for metric, value in condition_fidelity(task, video, pixels).items():
                    results[task][f'{name}/{metric}'].append(float(value))
            results[task]['student_teacher_latent_mse'].append(
                float((student - teacher).square().mean()))
            condition = pixels['frames'] if pixels.get('ref_images') is None else pixels['ref_images']
            panels = [condition, mask_to_video(pixels['masks']), videos['real'],
                      videos['teacher'], videos['student']]
            labels = ['condition', 'mask', 'real', f'teacher {teacher_steps}', 'student']
            write_mp4(osp.join(work_dir, 'samples', f'{task}_{index:04d}.mp4'),
                      side_by_side(panels, labels), fps=fps)

    n = sum(len(v) for v in per_task.values())
    metrics = {task: {k: sum(v) / len(v) for k, v in sorted(vals.items())}
               for task, vals in sorted(results.items())}
    summary = dict(
        metrics=metrics, samples=n, samples_per_task=samples_per_task,
        teacher_steps=teacher_steps, teacher_guidance=guidance,
        student_steps=len(distiller.generator_timesteps),
        teacher_seconds_per_sample=timing['teacher_seconds'] / max(n, 1),
        student_seconds_per_sample=timing['student_seconds'] / max(n, 1),
        checkpoint=checkpoint)
    path = osp.join(work_dir, 'metrics.json')
    with open(path, 'w') as f:
        json.dump(summary, f, indent=2)
    print_log(f'evaluate_vdot: {n} samples, metrics in {path}', logger='current')
    return dict(metrics_json=path, samples_dir=osp.join(work_dir, 'samples'))
