"""Generate videos with a VDOT student from a prompt and your own video condition unit.

    python -m vdot_ext.tools.infer --ckpt exports/vdot_wan14b --task depth \\
        --src_video depth.mp4 --prompt "..." --size 832*480 --frame_num 81 --save_file out.mp4

The flags are those of VACE's ``vace_wan_inference.py`` (``--src_video``, ``--src_mask``,
``--src_ref_images``, ``--prompt``, ``--size``, ``--frame_num``, ``--base_seed``/``--seed``,
``--sample_steps``/``--steps``, ``--save_dir``/``--save_file``, ``--offload_model``) plus
``--task``, ``--manifest`` (batch mode), the student's files (``--ckpt``, ``--lora``) and the
codecs' (``--vae``, ``--text_encoder``, ``--tokenizer``). See :mod:`vdot_ext.apis.inference`.
"""
import argparse
import json
import logging
import os.path as osp
import sys
import time

DEFAULT_CKPT = 'models/VDOT'


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if text in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (true/false), got {value!r}')


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m vdot_ext.tools.infer',
        description='Generate a video from a text prompt and a video condition unit (source video, mask,\n'
                    'reference images) with a VDOT few-step student (Wan2.1 / VACE).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Without --task, --src_video / --src_mask / --src_ref_images are used as they are, like VACE\n'
               '(a preprocessed condition video, a mask video, reference images). With --task, the condition is\n'
               'built from --src_video by the same code as the training data (grey, scribble, flow, outpaint,\n'
               'extension, inpaint, firstframe_*, reference_*); for depth and pose, --src_video is the depth or\n'
               'pose video. The codecs default to the Wan2.1 file names in the --ckpt folder or its parent:\n'
               'Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl.')
    model = parser.add_argument_group('model')
    model.add_argument('--ckpt', '--ckpt_dir', dest='ckpt', type=str, default=DEFAULT_CKPT,
                       help='The student: an export folder (<work_dir>/export of a training run, or python -m '
                            'vdot_ext.tools.export), a Wan2.1/VACE release folder, safetensors files, or a training '
                            'checkpoint (iter_N.pth file or DeepSpeed folder, final_model.pth). '
                            f'Default {DEFAULT_CKPT}.')
    model.add_argument('--lora', type=str, default=None,
                       help='A LoRA file (or peft adapter folder) merged into --ckpt: base + LoRA. Default None.')
    model.add_argument('--lora_alpha', type=float, default=None,
                       help='The LoRA alpha, when the LoRA file does not record it (scale alpha/rank).')
    model.add_argument('--config', type=str, default=None,
                       help='The training config, for the architecture of a training checkpoint (exports carry '
                            'their config.json). Default None: matched against the presets.')
    model.add_argument('--preset', type=str, default=None,
                       help='The architecture preset of a training checkpoint (e.g. wan2.1-vace-14b).')
    model.add_argument('--ckpt_prefix', type=str, default='generator.',
                       help='Prefix of the student inside a training checkpoint. Default "generator.".')
    model.add_argument('--ema', action='store_true', default=False,
                       help='Use the EMA weights of a training checkpoint.')
    model.add_argument('--vae', type=str, default=None,
                       help='The Wan VAE file. Default <ckpt>/Wan2.1_VAE.pth.')
    model.add_argument('--text_encoder', type=str, default=None,
                       help='The umT5 text encoder file. Default <ckpt>/models_t5_umt5-xxl-enc-bf16.pth.')
    model.add_argument('--tokenizer', type=str, default=None,
                       help='The umT5 tokenizer folder. Default <ckpt>/google/umt5-xxl.')
    model.add_argument('--dtype', type=str, default='bf16', choices=['bf16', 'fp32'],
                       help='Precision of the DiT and the text encoder (the VAE runs in fp32). Default bf16.')
    model.add_argument('--offload_model', '--offload', dest='offload', type=str2bool, nargs='?', const=True,
                       default=False,
                       help='Whether to offload idle models (text encoder, VAE, DiT) to CPU, reducing GPU '
                            'memory usage.')
    model.add_argument('--device', type=str, default=None,
                       help='Where to run. Default cuda when available, else cpu.')

    data = parser.add_argument_group('inputs')
    data.add_argument('--prompt', type=str, default=None,
                      help='The prompt to generate the video from.')
    data.add_argument('--src_video', type=str, default=None,
                      help='The file of the source video. Default None.')
    data.add_argument('--src_mask', type=str, default=None,
                      help='The file of the source mask (video or image; white = generate). Default None.')
    data.add_argument('--src_ref_images', type=str, default=None,
                      help="The file list of the source reference images. Separated by ','. Default None.")
    data.add_argument('--src_condition', type=str, default=None,
                      help='With --task: a control video made offline (depth, pose); --src_video is then the '
                           'source video (its first frame for firstframe_* tasks). Default None.')
    data.add_argument('--task', type=str, default=None,
                      help='The task that builds the condition from --src_video (an alias such as gray, '
                           'outpainting, firstframe_depth is accepted). Default None: the inputs as they are.')
    data.add_argument('--task_options', type=str, default=None,
                      help='Task options as JSON, e.g. \'{"expand_ratio": 0.3, "direction": ["left"]}\'.')
    data.add_argument('--box', type=str, default=None,
                      help='Inpainting box x0,y0,x1,y1 in source pixels (task inpaint without --src_mask).')
    data.add_argument('--manifest', type=str, default=None,
                      help='Batch mode: a VCU manifest (CSV/JSONL, the training data format); one video per '
                           'row into --save_dir.')

    sample = parser.add_argument_group('sampling')
    sample.add_argument('--size', type=str, default='832*480',
                        help='The area (width*height) of the generated video, or 480p / 720p. Default 832*480.')
    sample.add_argument('--frame_num', type=int, default=81,
                        help='How many frames to sample from a image or video. The number should be 4n+1. '
                             'Default 81.')
    sample.add_argument('--sample_steps', '--steps', dest='steps', type=int, default=None,
                        help='The sampling steps. Default: the student\'s (4).')
    sample.add_argument('--sample_shift', type=float, default=None,
                        help='Sampling shift factor of the timesteps. Default: the student\'s (5.0).')
    sample.add_argument('--base_seed', '--seed', dest='seed', type=int, default=2025,
                        help='The seed to use for generating the video (manifest row i: seed + i). Default 2025.')

    out = parser.add_argument_group('outputs')
    out.add_argument('--save_dir', type=str, default=None,
                     help='The folder to save the generated videos to. Default results/vdot/<time>.')
    out.add_argument('--save_file', type=str, default=None,
                     help='The file to save the generated video to. Default <save_dir>/out_video.mp4.')
    out.add_argument('--side_by_side', action='store_true', default=False,
                     help='Also write <name>_sbs.mp4: condition | mask | output.')
    out.add_argument('--fps', type=int, default=16, help='Frame rate of the written videos. Default 16.')
    return parser


def _fail(message: str):
    raise SystemExit(f'error: {message}')


def _codec_paths(args):
    from vdot_ext.apis.codecs import TEXT_ENCODER_FILE, TOKENIZER_DIR, VAE_FILE, default_codec_paths
    found = default_codec_paths(args.ckpt if osp.isdir(args.ckpt) else osp.dirname(args.ckpt))
    paths = dict(vae=args.vae or found['vae'], text_encoder=args.text_encoder or found['text_encoder'],
                 tokenizer=args.tokenizer or found['tokenizer'])
    names = dict(vae=VAE_FILE, text_encoder=TEXT_ENCODER_FILE, tokenizer=TOKENIZER_DIR)
    for key in ('vae', 'text_encoder'):
        if paths[key] is None:
            _fail(f'--{key}: not given and no {names[key]} in {args.ckpt} or its parent folder')
        if not osp.isfile(paths[key]):
            _fail(f'--{key}: file {paths[key]!r} does not exist')
    return paths


def _requests(args, frames, height, width):
    """[(sample_id, VCUPixels thunk, prompt, seed)] of the single sample or the manifest."""
    from vdot_ext.apis.inference import VCURequest, build_pixels
    if args.manifest:
        from vdot_ext.apis.inference import manifest_requests
        for flag in ('prompt', 'src_video', 'src_mask', 'src_ref_images', 'src_condition', 'task', 'box',
                     'task_options'):
            if getattr(args, flag) is not None:
                _fail(f'--{flag} and --manifest exclude each other (the manifest rows give the inputs)')
        dataset = manifest_requests(args.manifest, frames, height, width)
        return [(row.sample_id, (lambda i=i: dataset.build_pixels(i)), row.prompt, args.seed + i)
                for i, row in enumerate(dataset.rows)]
    if not args.prompt:
        _fail('--prompt: a prompt is required (or --manifest for batch mode)')
    options = {}
    if args.task_options:
        try:
            options = json.loads(args.task_options)
        except json.JSONDecodeError as exc:
            _fail(f'--task_options: not valid JSON ({exc})')
        if not isinstance(options, dict):
            _fail('--task_options: expected a JSON object')
    box = None
    if args.box:
        try:
            box = tuple(int(float(v)) for v in args.box.split(','))
        except ValueError:
            box = ()
        if len(box) != 4:
            _fail(f'--box: expected x0,y0,x1,y1, got {args.box!r}')
    refs = [p.strip() for p in args.src_ref_images.split(',') if p.strip()] if args.src_ref_images else []
    request = VCURequest(prompt=args.prompt, task=args.task, src_video=args.src_video, src_mask=args.src_mask,
                         src_ref_images=refs, src_condition=args.src_condition, options=options, box=box)
    return [('cli', lambda: build_pixels(request, frames, height, width), args.prompt, args.seed)]


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='[%(asctime)s] %(levelname)s: %(message)s',
                        handlers=[logging.StreamHandler(stream=sys.stdout)])
    log = logging.getLogger('vdot_ext.infer')
    import torch

    from vdot_ext.apis.inference import VDOTInference, parse_size, seconds_summary, write_outputs
    from vdot_ext.patches.video_reader import VCUInputError
    from vdot_ext.utils import write_json
    try:
        width, height = parse_size(args.size)
    except ValueError as exc:
        _fail(str(exc))
    if args.frame_num < 1 or (args.frame_num - 1) % 4:
        _fail(f'--frame_num: must be 4n+1 (Wan VAE), got {args.frame_num}')
    if args.manifest and args.save_file:
        _fail('--save_file names one video; with --manifest give --save_dir')
    if not osp.exists(args.ckpt):
        _fail(f'--ckpt: {args.ckpt!r} does not exist')
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    paths = _codec_paths(args)
    save_dir = args.save_dir or (osp.dirname(args.save_file) if args.save_file else
                                 osp.join('results', 'vdot', time.strftime('%Y-%m-%d-%H-%M-%S')))

    try:
        requests = _requests(args, args.frame_num, height, width)
        log.info(f'loading the student from {args.ckpt} ({args.dtype}, {device}, offload={args.offload})')
        pipe = VDOTInference.from_files(args.ckpt, vae=paths['vae'], text_encoder=paths['text_encoder'],
                                        tokenizer=paths['tokenizer'], lora=args.lora, lora_alpha=args.lora_alpha,
                                        config=args.config, preset=args.preset, ema=args.ema, dtype=args.dtype,
                                        device=device, offload=args.offload, prefix=args.ckpt_prefix)
        if args.sample_shift is not None:
            pipe.sampler['shift'] = float(args.sample_shift)
        log.info(f'timesteps {[round(float(t), 1) for t in pipe.timesteps(args.steps)]}')
        from tqdm import tqdm
        outputs = []
        rows = tqdm(requests, desc='videos', unit='video') if len(requests) > 1 else requests
        for sample_id, pixels_of, prompt, seed in rows:
            pixels = pixels_of()
            result = pipe.generate(pixels, prompt, seed=seed, steps=args.steps, progress=len(requests) == 1)
            target = args.save_file or osp.join(save_dir, 'out_video.mp4' if not args.manifest
                                                else f'{sample_id}.mp4')
            written = write_outputs(result, target, fps=args.fps, side_by_side=args.side_by_side)
            log.info(f'{sample_id}: task {pixels.task}, {seconds_summary(result.seconds)} -> {written["video"]}')
            outputs.append(dict(id=sample_id, task=pixels.task, prompt=prompt, seed=seed, seconds=result.seconds,
                                **written))
    except (VCUInputError, FileNotFoundError, ValueError, KeyError) as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    if args.manifest:
        summary = osp.join(save_dir, 'outputs.json')
        write_json(summary, dict(manifest=osp.abspath(args.manifest), ckpt=args.ckpt, outputs=outputs))
        log.info(f'{len(outputs)} videos; list in {summary}')
    log.info('Finished.')
    return outputs


if __name__ == '__main__':
    main()
