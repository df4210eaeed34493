"""Evaluate a VDOT student on a VCU manifest: ``mim test vdot_ext CONFIG --checkpoint CKPT``.

    mim test vdot_ext configs/vdot_wan14b.py --checkpoint exports/vdot_wan14b \\
        --manifest /data/vcu/test.csv --work-dir work_dirs/test_vdot_wan14b

(``mim test`` runs this file as ``test.py CONFIG CKPT --launcher none ...``.) For every
manifest row (or the first ``--max-samples``) the student generates a video from the
row's VCU with its few-step sampler (:mod:`vdot_ext.apis.inference`), and the
condition-fidelity metrics of :mod:`vdot_ext.evaluation.condition_fidelity` are
computed for the output and, as the reference, for the row's real video. Writes
``<work-dir>/samples/<id>.mp4`` (condition | mask | real | output) and
``<work-dir>/metrics.json`` (per-task means, per-sample values, timings), atomically.

The architecture of a training checkpoint comes from CONFIG (``model.generator``
or ``model.real_score``), the clip geometry from its training dataset (81 × 480 × 832
for the real recipes), the codecs from ``--vae``/``--text-encoder``/``--tokenizer``, or
the dataset's ``codec``, or the Wan2.1 file names beside the checkpoint.
"""
import argparse
import logging
import os
import os.path as osp
import sys
import time
from collections import defaultdict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog='tools/test.py',
                                     description='Evaluate a VDOT student on a VCU manifest (condition fidelity)')
    parser.add_argument('config', help='the training config (architecture, clip geometry, codecs)')
    parser.add_argument('checkpoint_pos', nargs='?', default=None, metavar='checkpoint',
                        help='the student (as --checkpoint; mim test passes it here)')
    parser.add_argument('--checkpoint', default=None,
                        help='the student: export folder, final_model.pth, iter_N.pth, safetensors')
    parser.add_argument('--manifest', default=None,
                        help='the VCU manifest to evaluate on (default: test_dataloader.dataset.manifest)')
    parser.add_argument('--work-dir', default=None, help='where samples/ and metrics.json go')
    parser.add_argument('--max-samples', type=int, default=None, help='evaluate only the first N rows')
    parser.add_argument('--vae', default=None)
    parser.add_argument('--text-encoder', default=None)
    parser.add_argument('--tokenizer', default=None)
    parser.add_argument('--lora', default=None)
    parser.add_argument('--lora-alpha', type=float, default=None)
    parser.add_argument('--ema', action='store_true', help='the EMA weights of a training checkpoint')
    parser.add_argument('--steps', type=int, default=None, help='sampling steps (default: the student\'s)')
    parser.add_argument('--seed', type=int, default=2025)
    parser.add_argument('--frame-num', type=int, default=None, help='default: the config\'s num_frames')
    parser.add_argument('--size', default=None, help='WIDTH*HEIGHT; default: the config\'s')
    parser.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32'])
    parser.add_argument('--device', default=None)
    parser.add_argument('--offload', action='store_true')
    parser.add_argument('--no-samples', action='store_true', help='do not write the sample videos')
    parser.add_argument('--fps', type=int, default=16)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.checkpoint and args.checkpoint_pos and args.checkpoint != args.checkpoint_pos:
        parser.error(f'two checkpoints given: {args.checkpoint_pos!r} and --checkpoint {args.checkpoint!r}')
    args.checkpoint = args.checkpoint or args.checkpoint_pos
    if not args.checkpoint:
        parser.error('the checkpoint is required (--checkpoint CKPT)')
    return args


def _unset(value) -> bool:
    return value is None or (isinstance(value, str) and value.startswith('???'))


def _dataset_cfg(cfg) -> dict:
    for key in ('test_dataloader', 'val_dataloader', 'train_dataloader'):
        loader = cfg.get(key) or {}
        if loader.get('dataset'):
            return dict(loader['dataset'])
    return {}


def _codecs(args, dataset_cfg):
    from vdot_ext.apis.codecs import default_codec_paths
    codec = dataset_cfg.get('codec') or {}
    from_cfg = dict(vae=(codec.get('vae') or {}).get('checkpoint'),
                    text_encoder=(codec.get('text_encoder') or {}).get('checkpoint'),
                    tokenizer=(codec.get('text_encoder') or {}).get('tokenizer'))
    ckpt = args.checkpoint
    beside = default_codec_paths(ckpt if osp.isdir(ckpt) else osp.dirname(osp.abspath(ckpt)))
    paths = {}
    for key, flag in (('vae', args.vae), ('text_encoder', args.text_encoder), ('tokenizer', args.tokenizer)):
        paths[key] = flag or (None if _unset(from_cfg[key]) else from_cfg[key]) or beside[key]
    for key in ('vae', 'text_encoder'):
        if not paths[key] or not osp.isfile(paths[key]):
            raise FileNotFoundError(f'--{key.replace("_", "-")}: no {key} file (given: {paths[key]!r}); set it, '
                                    'or train_dataloader.dataset.codec in the config')
    return paths


def fidelity_metrics(task: str, video, pixels: dict):
    """Condition-fidelity metrics, or {} for tasks without one."""
    from vdot_ext.evaluation.condition_fidelity import condition_fidelity
    try:
        return condition_fidelity(task, video, pixels)
    except ValueError as exc:
        if 'no metric' in str(exc):
            return {}
        raise


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='[%(asctime)s] %(levelname)s: %(message)s',
                        handlers=[logging.StreamHandler(stream=sys.stdout)])
    log = logging.getLogger('vdot_ext.test')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise SystemExit('error: tools/test.py evaluates in one process; run it with --launcher none')
    import torch
    from mmengine.config import Config

    from vdot_ext.apis.inference import VDOTInference, parse_size, write_video_atomic
    from vdot_ext.data.video_io import mask_to_video, side_by_side
    from vdot_ext.patches.vcu_dataset import VCUManifestDataset
    from vdot_ext.patches.video_reader import VCUInputError
    from vdot_ext.utils import write_json

    if not osp.isfile(args.config):
        raise SystemExit(f'error: config file {args.config!r} does not exist')
    cfg = Config.fromfile(args.config)
    dataset_cfg = _dataset_cfg(cfg)
    manifest = args.manifest or dataset_cfg.get('manifest')
    if _unset(manifest):
        raise SystemExit(f'error: --manifest: no manifest given and {args.config} sets none '
                         '(test_dataloader.dataset.manifest)')
    frames = args.frame_num or int(dataset_cfg.get('num_frames', 81))
    if args.size:
        width, height = parse_size(args.size)
    else:
        width, height = int(dataset_cfg.get('width', 832)), int(dataset_cfg.get('height', 480))
    work_dir = args.work_dir or osp.join('work_dirs', 'test_' + osp.splitext(osp.basename(args.config))[0])
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')

    try:
        paths = _codecs(args, dataset_cfg)
        data = VCUManifestDataset(manifest, num_frames=frames, height=height, width=width, pixels_only=True,
                                  task_options=dataset_cfg.get('task_options'))
        log.info(f'evaluating {args.checkpoint} on {manifest}: {len(data)} rows, {frames}×{height}×{width}')
        pipe = VDOTInference.from_files(args.checkpoint, vae=paths['vae'], text_encoder=paths['text_encoder'],
                                        tokenizer=paths['tokenizer'], lora=args.lora, lora_alpha=args.lora_alpha,
                                        config=args.config, ema=args.ema, dtype=args.dtype, device=device,
                                        offload=args.offload)
        count = len(data) if args.max_samples is None else min(len(data), args.max_samples)
        per_task, samples = defaultdict(lambda: defaultdict(list)), []
        from tqdm import tqdm
        for index in tqdm(range(count), desc='test', unit='video'):
            row = data.rows[index]
            pixels = data.build_pixels(index)
            result = pipe.generate(pixels, row.prompt, seed=args.seed + index, steps=args.steps, progress=False)
            real = pixels.video_tensor()
            fields = dict(frames=pixels.frames_tensor(), masks=pixels.masks_tensor(), ref_images=pixels.ref_images)
            metrics = {f'output/{k}': v for k, v in fidelity_metrics(row.task, result.video, fields).items()}
            metrics.update({f'real/{k}': v for k, v in fidelity_metrics(row.task, real, fields).items()})
            for key, value in metrics.items():
                per_task[row.task][key].append(float(value))
            entry = dict(id=row.sample_id, task=row.task, metrics=metrics, seconds=result.seconds)
            if not args.no_samples:
                panels = [pixels.frames_tensor(), mask_to_video(pixels.masks_tensor()), real, result.video]
                entry['sample'] = write_video_atomic(
                    osp.join(work_dir, 'samples', f'{row.sample_id}.mp4'),
                    side_by_side(panels, ['condition', 'mask', 'real', 'output']), args.fps)
            samples.append(entry)
    except (VCUInputError, FileNotFoundError, ValueError, KeyError) as exc:
        raise SystemExit(f'error: {exc.args[0] if isinstance(exc, KeyError) else exc}') from None

    summary = dict(
        checkpoint=args.checkpoint, config=osp.abspath(args.config), manifest=osp.abspath(manifest),
        samples=len(samples), steps=len(pipe.timesteps(args.steps)), geometry=[frames, height, width],
        metrics={task: {k: sum(v) / len(v) for k, v in sorted(vals.items())}
                 for task, vals in sorted(per_task.items())},
        seconds_per_sample=(sum(sum(s['seconds'].values()) for s in samples) / max(len(samples), 1)),
        per_sample=samples, time=time.strftime('%Y-%m-%d %H:%M:%S'))
    path = osp.join(work_dir, 'metrics.json')
    write_json(path, summary)
    log.info(f'{len(samples)} samples; metrics in {path}')
    return summary


if __name__ == '__main__':
    main()
