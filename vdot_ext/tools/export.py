"""Export a VDOT student to the Wan2.1 / VACE release layout (diffsynth, VACE, ComfyUI).

    python -m vdot_ext.tools.export --ckpt work_dirs/vdot_wan14b/iter_1200.pth --ema \\
        --config configs/vdot_wan14b.py --out exports/vdot_wan14b --dtype bf16

    # a LoRA run: the base weights + the adapters, merged
    python -m vdot_ext.tools.export --ckpt /ckpt/Wan2.1-VACE-14B \\
        --lora work_dirs/vdot_wan14b_lora/iter_1200.pth/lora_generator.pth --out exports/vdot_lora_merged

``--ckpt`` is anything :func:`vdot_ext.apis.student.load_student` reads (a training
checkpoint, a stage's ``final_model.pth``, a DeepSpeed checkpoint folder, safetensors,
an export or release folder). A training run already ends by writing
``<work_dir>/export`` (``ExportGeneratorHook``); this tool re-exports other checkpoints.
The output folder holds ``diffusion_pytorch_model-0000k-of-0000n.safetensors``, their
``.index.json``, ``config.json`` and ``vdot_student.json`` (:mod:`vdot_ext.apis.export`);
diffsynth loads it with ``ModelConfig(path=[the shards])`` like the official release.
"""
import argparse
import logging
import sys


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m vdot_ext.tools.export',
        description='Write a VDOT student (full, EMA, or base + LoRA merged) in the Wan2.1 / VACE release layout: '
                    'sharded safetensors + index, config.json.')
    parser.add_argument('--ckpt', required=True, nargs='+',
                        help='the student: training checkpoint (.pth), final_model.pth, a DeepSpeed checkpoint '
                             'folder (iter_N.pth/), safetensors file(s), or an export / release folder')
    parser.add_argument('--out', required=True, help='the export folder to write')
    parser.add_argument('--ema', action='store_true', help='export the EMA weights of a training checkpoint')
    parser.add_argument('--ema-base', default=None,
                        help='full weights completing an EMA file that covers part of the model '
                             '(ema_generator.safetensors of a LoRA run)')
    parser.add_argument('--lora', default=None, help='a LoRA file (or peft adapter folder) to merge into --ckpt')
    parser.add_argument('--lora-alpha', type=float, default=None,
                        help='LoRA alpha when the LoRA file does not record it (scale alpha/rank)')
    parser.add_argument('--config', default=None,
                        help='the training config (architecture of a training checkpoint, the sampler)')
    parser.add_argument('--preset', default=None, help='architecture preset of a training checkpoint')
    parser.add_argument('--ckpt-prefix', default='generator.',
                        help='prefix of the student in a training checkpoint (default "generator.")')
    parser.add_argument('--dtype', default=None, choices=['bf16', 'fp16', 'fp32'],
                        help='cast the weights (default: as stored)')
    parser.add_argument('--max-shard-size', default='5GB', help='bytes per shard, e.g. 5GB, 500MiB (default 5GB)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out folder')
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='[%(asctime)s] %(levelname)s: %(message)s',
                        handlers=[logging.StreamHandler(stream=sys.stdout)])
    log = logging.getLogger('vdot_ext.export')
    from vdot_ext.apis.export import export_generator, parse_size
    from vdot_ext.apis.student import load_student
    try:
        parse_size(args.max_shard_size, '--max-shard-size')
        ckpt = args.ckpt[0] if len(args.ckpt) == 1 else args.ckpt
        loaded = load_student(ckpt, lora=args.lora, lora_alpha=args.lora_alpha, config=args.config,
                              preset=args.preset, prefix=args.ckpt_prefix, ema=args.ema, ema_base=args.ema_base)
        for note in loaded.notes:
            log.info(note)
        result = export_generator(
            loaded.model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype, sampler=loaded.sampler,
            provenance=dict(ema=loaded.ema, sources=loaded.sources, lora=loaded.lora,
                            architecture_from=loaded.arch_from),
            overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        raise SystemExit(f'error: {exc.args[0] if isinstance(exc, KeyError) else exc}') from None
    log.info(f'wrote {result.num_tensors} tensors ({result.total_bytes / 1e9:.3f} GB) in {len(result.shards)} '
             f'shard(s) to {result.out_dir} [{result.config["_class_name"]}, diffsynth hash '
             f'{result.diffsynth_hash}]')
    return result


if __name__ == '__main__':
    main()
