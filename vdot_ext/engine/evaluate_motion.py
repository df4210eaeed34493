"""The MoGAN recipe's call stages: the fixed discriminator prompt and the motion evaluation (docs/DESIGN.md §13).

* :func:`prepare_motion_prompt` encodes MoGAN's discriminator prompt c* ("a video with good motion") once with
  the recipe's text encoder and writes it as safetensors, the ``prompt_embedding`` file of
  ``MotionDiscriminator``.
* :func:`evaluate_motion` samples every listed student (and optionally the teacher) from the same held-out
  prompts and the same noise, decodes them, and measures motion on the samples and on the real clips:
  VBench's dynamics degree, the motion magnitude (mean top-5 % flow / VBench's threshold) and the warping error
  over non-occluded pixels (:mod:`vdot_ext.evaluation.motion_metrics`; the weight-free Lucas–Kanade estimator
  unless ``flow_estimator`` names RAFT with a local weight file). It writes side-by-side samples with their
  flow fields and ``metrics.json``.
* :func:`summarize_motion_runs` turns the ``metrics.json`` of several runs (training seeds) into a mean ± std
  table::

      python -m vdot_ext.engine.evaluate_motion summarize RUN_DIR [RUN_DIR ...] [--out table.md]

  ``python -m vdot_ext.tools.mogan_seeds`` runs the recipe over seeds and writes the fuller table of
  ``benchmarks/RESULTS.md`` (every metric, the Table-2 rows, wall and CPU time).

The prompt file of a real-size recipe (umT5)::

      python -m vdot_ext.engine.evaluate_motion prompt --text-encoder models_t5_umt5-xxl-enc-bf16.pth \
          --tokenizer google/umt5-xxl --out-dir /ckpt/mogan_prompt [--device cuda]
"""
import argparse
import json
import os
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Union

import torch
from mmengine.logging import print_log

from vdot_ext.registry import DATASETS, FUNCTIONS, MODELS
from vdot_ext.utils import save_safetensors, write_json

from .stages import DONE_FILE, FINAL_WEIGHTS, WORK_DIR_TOKEN, substitute

METRIC_KEYS = ('dynamic_degree', 'motion_magnitude', 'warping_error')
METRICS_FILE = 'metrics.json'
PROMPT_FILE = 'prompt_embedding.safetensors'

ModelEntry = Union[str, dict]


@FUNCTIONS.register_module()
def prepare_motion_prompt(work_dir: str,
                          text_encoder_checkpoint: str,
                          tokenizer: Optional[str] = None,
                          prompt: Optional[str] = None,
                          device: str = 'cpu') -> Dict[str, object]:
    """Encode the discriminator's fixed prompt c* once (MoGAN §4.3) into ``<work_dir>/prompt_embedding.safetensors``.

    Args:
        text_encoder_checkpoint: the demo's ``TinyTextEncoder`` file, or Wan2.1's umT5 encoder
            (``models_t5_umt5-xxl-enc-bf16.pth``) with ``tokenizer`` (the ``google/umt5-xxl`` folder).
        prompt: default MoGAN's "a video with good motion".
        device: where the text encoder runs (umT5-XXL is slow on CPU; once per recipe).

    The file holds ``prompt_embedding`` [1, L, text_dim] (float32, zero past the prompt's tokens, as the
    training captions are encoded); its metadata records the prompt and the encoder file.
    """
    from vdot_ext.models.motion_discriminator import MOTION_PROMPT
    from vdot_ext.patches.vcu_codecs import UMT5Encoder, codec_file, tiny_codec_kind
    prompt = MOTION_PROMPT if prompt is None else prompt
    field = 'prepare_motion_prompt.text_encoder_checkpoint'
    if not text_encoder_checkpoint or not osp.isfile(text_encoder_checkpoint):
        raise FileNotFoundError(f'{field}: no file at {text_encoder_checkpoint!r}')
    if tiny_codec_kind(text_encoder_checkpoint) == 'TinyTextEncoder':
        from vdot_ext.models.tiny_codecs import TinyTextEncoder
        with codec_file(field):
            encoder = TinyTextEncoder.load(text_encoder_checkpoint)
    else:
        encoder = UMT5Encoder(text_encoder_checkpoint, tokenizer, device=device, field=field,
                              tokenizer_field='prepare_motion_prompt.tokenizer')
    with torch.no_grad():
        embedding = encoder.encode([prompt]).float().cpu()
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, PROMPT_FILE)
    save_safetensors({'prompt_embedding': embedding}, path,
                     metadata=dict(prompt=prompt, text_encoder=osp.abspath(text_encoder_checkpoint)))
    print_log(f'prepare_motion_prompt: {prompt!r} -> {path} {tuple(embedding.shape)}', logger='current')
    return dict(prompt_embedding=path, prompt=prompt, shape=list(embedding.shape))


def resolve_model_entry(name: str, entry: ModelEntry) -> dict:
    """``dict(model=<config>, checkpoint=<weights>)`` of a list entry: given as such, or a finished training
    stage's folder, whose ``stage_done.json`` holds the model config it trained (``{work_dir}`` = the folder's
    parent) and whose ``final_model.pth`` holds the weights. Reading the stage's own record keeps the
    evaluated model equal to the trained one (an ablation changes its training stage only)."""
    where = f'evaluate_motion.models.{name}'
    if isinstance(entry, dict):
        missing = {'model', 'checkpoint'} - set(entry)
        if missing:
            raise ValueError(f'{where}: a dict entry needs model and checkpoint; missing {sorted(missing)}')
        return dict(model=dict(entry['model']), checkpoint=entry['checkpoint'])
    if not isinstance(entry, str):
        raise TypeError(f'{where}: expected a training stage folder or dict(model=..., checkpoint=...), '
                        f'got {type(entry).__name__}')
    marker = osp.join(entry, DONE_FILE)
    if not osp.isfile(marker):
        raise FileNotFoundError(f'{where}: {marker} does not exist (is {entry!r} a finished training stage?)')
    with open(marker) as handle:
        record = json.load(handle)
    model = (record.get('config') or {}).get('model')
    if not isinstance(model, dict):
        raise ValueError(f'{where}: {marker} records no model config (a call stage, or an older marker)')
    recipe_dir = osp.dirname(osp.abspath(entry.rstrip(os.sep)))
    return dict(model=substitute(model, WORK_DIR_TOKEN, recipe_dir), checkpoint=osp.join(entry, FINAL_WEIGHTS))


def _load_distiller(name: str, entry: ModelEntry):
    from vdot_ext.models.weights import load_weights
    resolved = resolve_model_entry(name, entry)
    distiller = MODELS.build(resolved['model'])
    load_weights(distiller, resolved['checkpoint'], field=f'evaluate_motion.models.{name}')
    return distiller.eval(), resolved['checkpoint']


@torch.no_grad()
def sample_student(distiller, item: dict, noise: torch.Tensor, rng_seed: int) -> torch.Tensor:
    """The few-step sample of ``item`` from ``noise``, with the global torch RNG (the sampler's between-step
    re-noising) seeded by ``rng_seed`` inside a fork: every model gets the same re-noising for a sample, whatever
    ran before in the process (a seed's training stages), and the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng_seed))
        return distiller.generate(item['context'][None], None, noise.shape, noise=noise)


def _flow_panel(flows: torch.Tensor) -> 'object':
    """Flows [T−1, 2, H, W] → uint8 [T, H, W, 3] colour-wheel frames (last flow repeated), each field
    normalised by its own largest magnitude (RAFT's visualisation)."""
    import numpy as np

    from vdot_ext.patches.conditions import flow_to_color
    fields = flows.permute(0, 2, 3, 1).cpu().numpy()
    frames = [flow_to_color(f) for f in fields]
    return np.stack(frames + frames[-1:])


@FUNCTIONS.register_module()
def evaluate_motion(work_dir: str,
                    models: Dict[str, ModelEntry],
                    dataset: dict,
                    vae_checkpoint: str,
                    num_samples: int = 16,
                    seed: int = 1234,
                    flow_estimator: Optional[dict] = None,
                    fps: float = 8.0,
                    samples_to_write: int = 4,
                    teacher_steps: int = 0,
                    teacher_shift: float = 5.0) -> Dict[str, object]:
    """Motion metrics of the listed students on held-out prompts (MoGAN §5.2 on the tiny demo).

    Args:
        models: ``{name: stage folder or dict(model=..., checkpoint=...)}`` (see :func:`resolve_model_entry`),
            sampled in this order with their own few steps.
        dataset: held-out text-to-video data (``context``, ``latents`` for the shape, ``get_pixels(i)['video']``
            for the real clip when the dataset has it).
        vae_checkpoint: the VAE that decodes every sample (``load_wan_vae``: Wan2.1 or the tiny one).
        num_samples: the first ``num_samples`` items; sample i uses noise i of a generator seeded by ``seed``
            and the re-noising seed ``validation_hook.renoise_seed(seed, i)`` (the same for every model and
            every run).
        flow_estimator: the metrics' estimator (None: ``LucasKanadeFlow``; e.g. ``dict(type='RAFTFlow',
            weights_path=...)``).
        samples_to_write: side-by-side mp4s (real, each model; each with its flow field) of the first items.
        teacher_steps: > 0 also samples the first model's teacher with that many Euler steps (its CFG).

    Writes ``<work_dir>/samples/<index>.mp4`` and ``<work_dir>/metrics.json``:
    ``{'models': {name: metrics}, 'real': metrics, 'estimator', 'num_samples', 'seed', 'checkpoints'}``.
    """
    from vdot_ext.data.video_io import side_by_side, write_mp4
    from vdot_ext.engine.validation_hook import renoise_seed
    from vdot_ext.evaluation.motion_metrics import motion_metrics
    from vdot_ext.models.optical_flow import build_flow_estimator
    from vdot_ext.models.samplers import euler_sample
    from vdot_ext.patches.vcu_codecs import load_wan_vae, wan_vae_of

    if not models:
        raise ValueError('evaluate_motion.models: give at least one model to evaluate')
    if int(num_samples) < 1:
        raise ValueError(f'evaluate_motion.num_samples must be >= 1, got {num_samples}')
    os.makedirs(osp.join(work_dir, 'samples'), exist_ok=True)
    data = DATASETS.build(dataset)
    count = min(int(num_samples), len(data))
    vae = load_wan_vae(vae_checkpoint, field='evaluate_motion.vae_checkpoint')
    estimator = build_flow_estimator(None if flow_estimator is None else dict(flow_estimator))

    generator = torch.Generator().manual_seed(int(seed))
    items = [data[i] for i in range(count)]
    noises = [torch.randn((1, ) + tuple(item['latents'].shape), generator=generator) for item in items]
    if any(int(item.get('num_ref', 0)) for item in items):
        raise ValueError('evaluate_motion.dataset: items with reference frames; the motion evaluation samples '
                         'text-to-video (task t2v)')

    wan_vae = wan_vae_of(vae)

    def decode(latents):            # WanVideoVAE.decode, clamped: [T, 3, H, W] in [-1, 1]
        return wan_vae.decode(latents.float(), device=latents.device).float().clamp(-1, 1)[0].transpose(0, 1)

    videos: Dict[str, List[torch.Tensor]] = {}
    seconds: Dict[str, float] = {}
    checkpoints: Dict[str, str] = {}
    teacher = None
    for name, entry in models.items():
        distiller, checkpoints[name] = _load_distiller(name, entry)
        if teacher_steps and teacher is None:
            teacher = distiller
        start = time.perf_counter()
        videos[name] = [decode(sample_student(distiller, item, noise, renoise_seed(seed, index)))
                        for index, (item, noise) in enumerate(zip(items, noises))]
        seconds[name] = (time.perf_counter() - start) / count
        if teacher is not distiller:
            del distiller
    if teacher is not None:
        name = f'teacher ({teacher_steps} steps)'
        start = time.perf_counter()
        videos[name] = [decode(euler_sample(teacher.real_score, noise, item['context'][None], None, teacher_steps,
                                            teacher_shift, teacher.guidance_scale))
                        for item, noise in zip(items, noises)]
        seconds[name] = (time.perf_counter() - start) / count
    if hasattr(data, 'get_pixels'):
        videos['real'] = [data.get_pixels(i)['video'].transpose(0, 1).float() for i in range(count)]

    metrics = {name: motion_metrics(torch.stack(clips), estimator, fps=fps) for name, clips in videos.items()}
    for name, value in seconds.items():
        metrics[name]['seconds_per_sample'] = value

    for index in range(min(int(samples_to_write), count)):
        panels, labels = [], []
        for name, clips in videos.items():
            clip = clips[index]
            with torch.no_grad():
                flows = estimator(clip[None].float())[0]
            panels += [clip.transpose(0, 1), _flow_panel(flows)]
            labels += [name, 'flow']
        write_mp4(osp.join(work_dir, 'samples', f'{index:04d}.mp4'), side_by_side(panels, labels), fps=int(fps))

    summary = dict(models={k: v for k, v in metrics.items() if k != 'real'}, real=metrics.get('real'),
                   estimator=estimator.name, num_samples=count, seed=int(seed), checkpoints=checkpoints,
                   noise_rule='noise i: draw i of torch.Generator(seed); re-noising: renoise_seed(seed, i)',
                   prompts=[item.get('prompt') for item in items])
    path = osp.join(work_dir, METRICS_FILE)
    write_json(path, summary)
    table = format_table({k: {m: dict(mean=v[m], std=0.0, n=1) for m in METRIC_KEYS}
                          for k, v in metrics.items()})
    print_log(f'evaluate_motion: {count} samples per model, estimator {estimator.name}\n{table}\n'
              f'metrics in {path}', logger='current')
    return dict(metrics_json=path, samples_dir=osp.join(work_dir, 'samples'))


# ----------------------------------------------------------------------------------- several runs (seeds)
def _metrics_file(run: str) -> str:
    """``run`` is a metrics.json, an evaluation stage folder, or a recipe work dir holding one."""
    if osp.isfile(run):
        return run
    for candidate in (osp.join(run, METRICS_FILE), osp.join(run, 'motion_eval', METRICS_FILE)):
        if osp.isfile(candidate):
            return candidate
    raise FileNotFoundError(f'summarize_motion_runs: no {METRICS_FILE} in {run!r} or {osp.join(run, "motion_eval")}')


def summarize_motion_runs(runs: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean and sample std over runs of each model's metrics: ``{name: {metric: dict(mean, std, n)}}``.

    Every run must have the same estimator (metrics of different estimators are not comparable)."""
    from vdot_ext.evaluation.motion_metrics import summarize
    per_model: Dict[str, List[dict]] = {}
    estimators = set()
    for run in runs:
        with open(_metrics_file(run)) as handle:
            record = json.load(handle)
        estimators.add(record['estimator'])
        entries = dict(record['models'])
        if record.get('real') is not None:
            entries['real'] = record['real']
        for name, values in entries.items():
            per_model.setdefault(name, []).append(values)
    if len(estimators) > 1:
        raise ValueError(f'summarize_motion_runs: the runs used different flow estimators {sorted(estimators)}')
    return {name: summarize(values, METRIC_KEYS) for name, values in per_model.items()}


def format_table(summary: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """A markdown table: one row per model, mean ± std (n runs) per metric."""
    lines = ['| model | runs | dynamics degree ↑ | motion magnitude | warping error ↓ |', '|---|---|---|---|---|']
    for name, values in summary.items():
        n = values[METRIC_KEYS[0]]['n']
        cells = [f'{values[k]["mean"]:.4f} ± {values[k]["std"]:.4f}' for k in METRIC_KEYS]
        lines.append(f'| {name} | {n} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MoGAN recipe helpers: D's prompt file; mean ± std of motion "
                                     'metrics over runs (e.g. training seeds)')
    sub = parser.add_subparsers(dest='command', required=True)
    summarize_parser = sub.add_parser('summarize', help='a markdown table from several runs')
    summarize_parser.add_argument('runs', nargs='+', help='metrics.json files, motion_eval folders or work dirs')
    summarize_parser.add_argument('--out', help='also write the table (and the numbers as JSON) here')
    prompt_parser = sub.add_parser('prompt', help="encode D's fixed prompt once (prepare_motion_prompt)")
    prompt_parser.add_argument('--text-encoder', required=True, help='umT5 encoder file or the tiny one')
    prompt_parser.add_argument('--tokenizer', help='the google/umt5-xxl folder (umT5 only)')
    prompt_parser.add_argument('--out-dir', required=True, help='writes prompt_embedding.safetensors here')
    prompt_parser.add_argument('--prompt', default=None, help='default: "a video with good motion"')
    prompt_parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    if args.command == 'prompt':
        result = prepare_motion_prompt(args.out_dir, args.text_encoder, args.tokenizer, args.prompt, args.device)
        print(result['prompt_embedding'])
        return
    summary = summarize_motion_runs(args.runs)
    table = format_table(summary)
    print(table)
    if args.out:
        with open(args.out, 'w') as handle:
            handle.write(table + '\n')
        write_json(osp.splitext(args.out)[0] + '.json', dict(runs=list(args.runs), summary=summary))


if __name__ == '__main__':
    main()
