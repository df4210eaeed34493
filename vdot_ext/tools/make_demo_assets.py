"""Make the tiny demo's pretrained assets: the tiny Wan VAE, the tiny umT5 text
encoder and the tiny VACE-Wan teacher, as safetensors (docs/DESIGN.md §8).

    python -m vdot_ext.tools.make_demo_assets --out vdot_ext/demo_assets

Runs the ``codecs`` and ``teacher`` stages of ``configs/vdot_tiny.py`` from
scratch (``VDOT_DEMO_ASSETS=none``) through ``vdot_ext.tools.train`` — the same
stage driver, codec trainer and ``FlowMatchingPretrainer`` as the demo's
from-scratch path — with longer settings (``ASSET_OPTIONS``, overridable with
``--cfg-options``), then writes to ``--out``:

* ``tiny_wan_vae.safetensors`` (``TinyWanVAE.save_safetensors``: ``VideoVAE_``
  weights, latent mean/std; config, recipe and metrics as metadata), its
  decoder fine-tuned alone (``--decoder-steps``) after the teacher was trained:
  the encoder, hence every latent the teacher learnt from, is unchanged,
* ``tiny_text_encoder.safetensors`` (``TinyTextEncoder.save_safetensors``),
* ``tiny_vace_teacher.safetensors`` (the ``WanVACEScore`` state dict, no prefix),
* ``manifest.json``: SHA-256 and size of each file, the command, its wall and
  CPU time, the options, the codec's PSNR on the demo's held-out videos, the
  versions of the renderer and libraries.

``--init-from FOLDER`` continues from earlier assets instead of starting from
scratch: FOLDER's codec files are kept byte for byte (the latents the teacher
learnt from stay the same), the teacher stage starts from FOLDER's teacher, and
the new manifest keeps FOLDER's manifest as ``parent``, so the whole recipe of a
chain of runs stays recorded.

It prints the ``demo_asset_sha256`` lines to pin in ``configs/vdot_tiny.py``.
The stages' work dir (``--work-dir``, default ``work_dirs/demo_assets``) keeps
the logs; a rerun with the same options reuses finished stages.
"""
import argparse
import json
import os
import os.path as osp
import platform
import shutil
import sys
import time

# the asset recipe: the demo's from-scratch stages, trained longer (~35 min CPU at 1 thread)
ASSET_OPTIONS = {
    'stages.codecs.call.num_train_videos': 96,
    'stages.codecs.call.vae_steps': 2000,
    'stages.codecs.call.vae_lr': 2e-3,
    'stages.codecs.call.vae_batch_size': 2,
    'stages.teacher.runner.train_cfg.max_iters': 12000,
    'stages.teacher.runner.train_dataloader.dataset.num_samples': 1024,
}
# then the codec's decoder alone (the latents the teacher learnt stay bit-identical)
DECODER_STEPS = 1500
DECODER_LR = 1e-3
TEACHER_SCHEDULE = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=300),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=300, end=None, eta_min_ratio=0.05),
]


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Make the tiny demo\'s pretrained codec and teacher assets')
    parser.add_argument('--out', required=True, help='output folder (the shipped one: vdot_ext/demo_assets)')
    parser.add_argument('--config', default='configs/vdot_tiny.py', help='the demo config')
    parser.add_argument('--work-dir', default=None, help='work dir of the stages (default: work_dirs/demo_assets)')
    parser.add_argument('--decoder-steps', type=int, default=DECODER_STEPS,
                        help='fine-tune the codec\'s decoder alone for this many steps after the teacher (0: no)')
    parser.add_argument('--decoder-lr', type=float, default=DECODER_LR, help='its peak learning rate')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={}, metavar='KEY=VALUE',
                        help='override ASSET_OPTIONS or other config entries')
    parser.add_argument('--device', default='cpu',
                        help='where the codec\'s training steps and the teacher check run (e.g. cuda); the '
                             'teacher stage runs where mmengine\'s runner puts it (CUDA when available)')
    parser.add_argument('--check-samples', type=int, default=12,
                        help='held-out VCUs per task on which the teacher\'s condition fidelity is measured '
                             '(recorded in the manifest; 0: skip)')
    parser.add_argument('--note', default=None,
                        help='text kept in manifest.json, e.g. where reused stages of the work dir ran')
    parser.add_argument('--init-from', default=None, metavar='FOLDER',
                        help='continue from the assets in FOLDER (e.g. vdot_ext/demo_assets): its codec files are '
                             'kept byte for byte, so the latents the teacher learnt from stay the same, and the '
                             'teacher stage starts from its teacher; the new manifest keeps FOLDER\'s as "parent"')
    args = parser.parse_args(argv)
    if args.init_from is not None and args.decoder_steps > 0:
        parser.error('--init-from keeps the codec of FOLDER unchanged; pass --decoder-steps 0 with it')
    return args


def _held_out_psnr(vae_path: str, num_frames: int, height: int, width: int, count: int = 16) -> float:
    """Reconstruction PSNR of the codec on the demo evaluation's held-out videos (seed 99)."""
    from vdot_ext.data.synthetic_videos import render_training_videos
    from vdot_ext.models.tiny_codecs import TinyWanVAE, recon_psnr
    videos = render_training_videos(count, num_frames, height, width, seed=99)
    return recon_psnr(TinyWanVAE.load(vae_path), videos)


def _finetune_decoder(vae_pth: str, out_pth: str, cfg, options: dict, steps: int, lr: float,
                      device: str = 'cpu') -> dict:
    """``train_tiny_vae(decoder_only=True)`` on the codec stage's training videos; cached in ``out_pth``."""
    from mmengine.logging import MMLogger

    from vdot_ext.data.synthetic_videos import render_training_videos
    from vdot_ext.models.tiny_codecs import TinyWanVAE, file_sha256, train_tiny_vae
    from vdot_ext.utils import safe_torch_load
    call = cfg.stages.codecs.call
    seed = int(call.get('seed', 0))
    recipe = dict(source_sha256=file_sha256(vae_pth), steps=steps, lr=lr,
                  num_train_videos=int(options.get('stages.codecs.call.num_train_videos', 48)),
                  batch_size=int(options.get('stages.codecs.call.vae_batch_size', 2)), crop_size=32, seed=seed)
    if osp.isfile(out_pth):
        extra = safe_torch_load(out_pth, field='fine-tuned VAE').get('extra', {})
        if extra.get('decoder_finetune', {}).get('recipe') == recipe:
            return extra['decoder_finetune']
    vae = TinyWanVAE.load(vae_pth)
    frames, height, width = cfg.num_frames, cfg.height, cfg.width
    videos = render_training_videos(recipe['num_train_videos'], frames, height, width, seed + 1_000_003)
    eval_videos = render_training_videos(8, frames, height, width, seed + 2_000_003)
    result = train_tiny_vae(vae, videos, steps=steps, lr=lr, batch_size=recipe['batch_size'],
                            crop_size=recipe['crop_size'], eval_videos=eval_videos, seed=seed + 1,
                            logger=MMLogger.get_current_instance(), log_every=max(steps // 6, 1),
                            decoder_only=True, device=device)
    finetune = dict(recipe=recipe, metrics=result)
    source_extra = safe_torch_load(vae_pth, field='tiny VAE checkpoint').get('extra', {})
    vae.save(out_pth, extra=dict(source_extra, decoder_finetune=finetune))
    return finetune


def main(argv=None):
    args = parse_args(argv)
    start, cpu_start = time.time(), time.process_time()
    os.environ['VDOT_DEMO_ASSETS'] = 'none'  # the config's from-scratch path
    from mmengine.config import Config

    from vdot_ext.data.synthetic_videos import DATASET_VERSION, GENERATOR_VERSION
    from vdot_ext.models.tiny_codecs import DEMO_ASSET_FILES, DEMO_MANIFEST, TinyTextEncoder, TinyWanVAE, file_sha256
    from vdot_ext.models.weights import read_state_dict
    from vdot_ext.tools import train
    from vdot_ext.utils import save_safetensors, write_json

    out = osp.abspath(args.out)
    work_dir = osp.abspath(args.work_dir or osp.join('work_dirs', 'demo_assets'))
    options = dict(ASSET_OPTIONS, **args.cfg_options)
    if args.device != 'cpu':
        options['stages.codecs.call.vae_device'] = args.device
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(options)  # what the stages run: the manifest and the teacher's metadata describe it
    max_iters = options['stages.teacher.runner.train_cfg.max_iters']
    # warm-up: 300 iterations, or a tenth of a shorter run
    warmup = min(TEACHER_SCHEDULE[0]['end'], max(1, int(max_iters) // 10))
    schedule = [dict(TEACHER_SCHEDULE[0], end=warmup), dict(TEACHER_SCHEDULE[1], begin=warmup, end=int(max_iters))]
    teacher = dict(param_scheduler=schedule)
    parent = None
    if args.init_from is not None:
        parent = _parent_assets(args.init_from)
        # both stages start from the parent's files, checked against its manifest.json (the folder as the
        # user gave it, as in the recorded command)
        options['stages.codecs.call.pretrained'] = args.init_from
        # (_delete_: the from-scratch config's value is None, which mmengine will not merge a dict into)
        teacher['model'] = dict(pretrained=dict(_delete_=True, assets=args.init_from, sha256=None))
    # the options file keeps the schedule (a list) and the teacher's start (a dict) out of the command line
    options_file = osp.join(work_dir, 'asset_options.py')
    os.makedirs(work_dir, exist_ok=True)
    with open(options_file, 'w') as handle:
        handle.write(f'_base_ = [{osp.abspath(args.config)!r}]\n')
        handle.write(f'stages = dict(teacher=dict(runner={teacher!r}))\n')
    argv_train = [options_file, '--work-dir', work_dir, '--stages', 'codecs', 'teacher',
                  '--cfg-options'] + [f'{k}={v}' for k, v in options.items()]
    train.main(argv_train)
    stage_seconds = {}
    for stage in ('codecs', 'teacher'):
        with open(osp.join(work_dir, stage, 'stage_done.json')) as handle:
            stage_seconds[stage] = json.load(handle)['result'].get('seconds')

    os.makedirs(out, exist_ok=True)
    vae_pth = osp.join(work_dir, 'codecs', 'tiny_wan_vae.pth')
    if args.decoder_steps > 0:
        finetuned = osp.join(work_dir, 'codec_decoder', 'tiny_wan_vae.pth')
        finetune = _finetune_decoder(vae_pth, finetuned, cfg, options, args.decoder_steps, args.decoder_lr,
                                     args.device)
        stage_seconds['decoder_finetune'] = round(finetune['metrics']['train_seconds'], 1)
        vae_pth = finetuned
    held_out = _held_out_psnr(vae_pth, cfg.num_frames, cfg.height, cfg.width)
    if parent is None:
        payload_extra = _vae_extra(vae_pth)
        payload_extra['metrics'] = dict(payload_extra.get('metrics', {}), held_out_recon_psnr=held_out)
        TinyWanVAE.load(vae_pth).save_safetensors(osp.join(out, DEMO_ASSET_FILES['vae']), extra=payload_extra)
        TinyTextEncoder.load(osp.join(work_dir, 'codecs', 'tiny_text_encoder.pth')).save_safetensors(
            osp.join(out, DEMO_ASSET_FILES['text_encoder']))
    else:
        # the parent's codec files unchanged (same bytes, same SHA-256), whatever the stage re-saved
        payload_extra = dict(metrics=parent['manifest'].get('metrics', {}).get('codec', {}).get('training', {}))
        for key in ('vae', 'text_encoder'):
            source, target = parent['files'][key], osp.join(out, DEMO_ASSET_FILES[key])
            if osp.abspath(source) != osp.abspath(target):
                shutil.copyfile(source, target)
    teacher_state = read_state_dict(osp.join(work_dir, 'teacher', 'final_model.pth'), 'teacher final_model.pth')
    score = {k[len('score.'):]: v for k, v in teacher_state.items() if k.startswith('score.')}
    if not score:
        raise ValueError(f'{work_dir}/teacher/final_model.pth: no score.* weights')
    teacher_cfg = cfg.stages.teacher.runner.model.score.to_dict()
    save_safetensors(score, osp.join(out, DEMO_ASSET_FILES['teacher']),
                     metadata=dict(kind='WanVACEScore', config=json.dumps(teacher_cfg)))

    teacher_check = None
    if args.check_samples > 0:
        teacher_check = teacher_fidelity(cfg, work_dir, osp.join(out, DEMO_ASSET_FILES['vae']),
                                         osp.join(out, DEMO_ASSET_FILES['teacher']), args.check_samples,
                                         device=args.device)
        write_json(osp.join(work_dir, 'teacher_check.json'), teacher_check, indent=1)

    import diffsynth
    import torch
    files = {}
    for name in DEMO_ASSET_FILES.values():
        path = osp.join(out, name)
        files[name] = dict(sha256=file_sha256(path), bytes=osp.getsize(path))
    manifest = dict(
        command='python -m vdot_ext.tools.make_demo_assets ' + ' '.join(sys.argv[1:] if argv is None else argv),
        config=args.config, options=options, teacher_param_scheduler=schedule,
        decoder_finetune=dict(steps=args.decoder_steps, lr=args.decoder_lr),
        # this invocation (finished stages of an earlier one are reused); stage_seconds: each step's own run
        wall_seconds=round(time.time() - start, 1), cpu_seconds=round(time.process_time() - cpu_start, 1),
        stage_seconds=stage_seconds, stage_seconds_total=round(sum(stage_seconds.values()), 1),
        torch_num_threads=cfg.get('torch_num_threads'),
        metrics=dict(codec=dict(held_out_recon_psnr=held_out, training=payload_extra['metrics'],
                                decoder_finetune=payload_extra.get('decoder_finetune', {}).get('metrics')),
                     teacher=dict(_last_loss(work_dir), condition_fidelity=teacher_check)),
        generator_version=GENERATOR_VERSION, dataset_version=DATASET_VERSION,
        versions=dict(torch=torch.__version__, diffsynth=getattr(diffsynth, '__version__', 'unknown'),
                      python=platform.python_version()),
        made=time.strftime('%Y-%m-%d %H:%M:%S %Z'), note=args.note, files=files,
        # the assets this run continued from (--init-from): their manifest, with its own parent
        parent=None if parent is None else dict(folder=args.init_from, manifest=parent['manifest']))
    write_json(osp.join(out, DEMO_MANIFEST), manifest, indent=1)
    print(f'demo assets in {out} ({manifest["wall_seconds"]} s wall, {manifest["cpu_seconds"]} s CPU); '
          f'codec held-out PSNR {held_out:.2f} dB. Pin in configs/vdot_tiny.py:')
    print('demo_asset_sha256 = dict(')
    for key, name in DEMO_ASSET_FILES.items():
        print(f"    {key}='{files[name]['sha256']}',")
    print(')')
    return manifest


def teacher_fidelity(cfg, work_dir: str, vae_asset: str, teacher_asset: str, samples_per_task: int,
                     steps=(40, 4), device: str = 'cpu') -> dict:
    """The teacher's condition fidelity before any distillation: the demo evaluation's held-out VCUs
    (its dataset, first ``samples_per_task`` of each task), the same seeded noise per sample
    (``validation_hook.sample_noise``), Euler with the demo's CFG at each of ``steps``; rows ``codec``
    (the real latents decoded) and ``teacher@<steps>``, mean ± SE per task metric."""
    import torch

    from vdot_ext.engine.evaluate_demo import evaluation_settings, mean_se
    from vdot_ext.engine.stages import WORK_DIR_TOKEN, substitute
    from vdot_ext.engine.validation_hook import decode, held_out_indices, sample_noise
    from vdot_ext.evaluation.condition_fidelity import condition_fidelity
    from vdot_ext.models.samplers import euler_sample
    from vdot_ext.models.tiny_codecs import TinyWanVAE
    from vdot_ext.models.weights import load_weights
    from vdot_ext.registry import DATASETS, MODELS
    call = evaluation_settings(cfg.stages.evaluate.call)
    dataset = substitute(call['dataset'].to_dict(), WORK_DIR_TOKEN, work_dir)
    data = DATASETS.build(dataset)
    vae = TinyWanVAE.load_safetensors(vae_asset)
    score = MODELS.build(cfg.stages.teacher.runner.model.score.to_dict())
    load_weights(score, teacher_asset, field='make_demo_assets teacher')
    score.to(device).eval()
    model = cfg.stage2_model
    if model.get('uncond', 'zeros') != 'zeros':
        raise ValueError(f'{cfg.filename}: stage2_model.uncond={model.uncond!r}; the teacher check builds the '
                         "zero-text unconditional branch of the demo teacher (uncond='zeros')")
    seed, shift = int(call['seed']), float(call['teacher_shift'])
    guidance = float(model.guidance_scale if call['teacher_guidance'] is None else call['teacher_guidance'])
    values = {}
    start = time.time()
    with torch.no_grad():
        for task, index in held_out_indices(data, samples_per_task):
            item, pixels = data[index], data.get_pixels(index)
            noise = sample_noise((1, ) + tuple(item['latents'].shape), seed, index).to(device)
            context = item['context'][None].to(device)
            vace = item.get('vace_context')
            vace = None if vace is None else vace[None].to(device)
            latents = {'codec': item['latents'][None].float()}
            for n in steps:
                latents[f'teacher@{n}'] = euler_sample(score, noise, context, vace, n, shift, guidance,
                                                       torch.zeros_like(context)).cpu()
            n_ref = int(item.get('num_ref', 0))
            for row, lat in latents.items():
                for metric, value in condition_fidelity(task, decode(vae, lat, n_ref), pixels).items():
                    values.setdefault(task, {}).setdefault(metric, {}).setdefault(row, []).append(float(value))
    return dict(samples_per_task=samples_per_task, steps=list(steps), guidance=guidance, shift=shift,
                seconds=round(time.time() - start, 1), device=str(device),
                stats={task: {metric: {row: mean_se(v) for row, v in rows.items()}
                              for metric, rows in metrics.items()} for task, metrics in values.items()})


def _parent_assets(folder: str) -> dict:
    """``--init-from``: the asset folder's manifest and its three files, each checked against the manifest's
    SHA-256, read before anything in ``--out`` (which may be the same folder) is rewritten."""
    from vdot_ext.models.tiny_codecs import DEMO_ASSET_FILES, DEMO_MANIFEST, demo_assets_dir, verify_demo_asset
    path = osp.abspath(demo_assets_dir(folder))
    manifest_path = osp.join(path, DEMO_MANIFEST)
    if not osp.isfile(manifest_path):
        raise FileNotFoundError(f'--init-from {folder}: no {manifest_path} (an asset folder written by '
                                'make_demo_assets)')
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    files = {key: verify_demo_asset(path, key, None) for key in DEMO_ASSET_FILES}
    return dict(manifest=manifest, files=files)


def _vae_extra(vae_pth: str) -> dict:
    from vdot_ext.utils import safe_torch_load
    payload = safe_torch_load(vae_pth, field='tiny VAE checkpoint')
    return json.loads(json.dumps(payload.get('extra', {}), default=str))


def _last_loss(work_dir: str) -> dict:
    """The teacher's flow-matching loss over its last logged iterations (from the stage's scalars)."""
    from glob import glob
    paths = sorted(glob(osp.join(work_dir, 'teacher', '*', 'vis_data', 'scalars.json')))
    if not paths:
        return {}
    losses = []
    with open(paths[-1]) as handle:
        for line in handle:
            record = json.loads(line)
            if 'loss_flow' in record:
                losses.append((record.get('iter', record.get('step')), record['loss_flow']))
    tail = losses[-20:]
    return dict(loss_flow_last=sum(v for _, v in tail) / max(len(tail), 1), iterations=tail[-1][0] if tail else None)


if __name__ == '__main__':
    main()
