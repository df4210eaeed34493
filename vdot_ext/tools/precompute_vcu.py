"""Precompute the VCU cache of a manifest: text embeddings, video latents, ``vace_context``.

    python -m vdot_ext.tools.precompute_vcu MANIFEST --cache-dir DIR \\
        --vae-type WanVideoVAE --vae-checkpoint /ckpt/Wan2.1_VAE.pth \\
        --text-encoder-type WanTextEncoder \\
        --text-encoder-checkpoint /ckpt/models_t5_umt5-xxl-enc-bf16.pth \\
        --tokenizer /ckpt/google/umt5-xxl --device cuda --batch-size 2

or take the dataset settings from a training config (flags given here win)::

    python -m vdot_ext.tools.precompute_vcu --config configs/vdot_wan14b.py \\
        --manifest /data/vcu/train.csv --cache-dir /data/vcu/cache --vae-checkpoint ...

Samples already in the cache are skipped (the cache is keyed by the pixel
configuration and the codecs; see ``VCUManifestDataset``), the rest are
encoded in batches of samples with the same number of reference images.
``--skip-bad`` logs and counts bad samples (bad manifest rows, unreadable videos,
NaN/Inf encodings) instead of stopping at the first; ``errors`` in the returned
summary maps each skipped sample's id (``'<id> (<manifest> line <n>)'``) to why.
Cache files are written atomically, so an interrupted run is simply rerun.
"""
import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch

logger = logging.getLogger('vdot_ext.precompute_vcu')

DATASET_FLAGS = ('manifest', 'cache_dir', 'num_frames', 'height', 'width', 'frame_stride', 'fps',
                 'resize_mode', 'resize_shrink', 'on_short', 'negative_prompt', 'cache_dtype', 'seed')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('manifest_pos', nargs='?', help='manifest (CSV/JSONL)')
    p.add_argument('--manifest', default=None)
    p.add_argument('--config', default=None, help='training config; its '
                   'train_dataloader.dataset provides defaults')
    p.add_argument('--cache-dir', dest='cache_dir', default=None)
    p.add_argument('--num-frames', dest='num_frames', type=int, default=None)
    p.add_argument('--height', type=int, default=None)
    p.add_argument('--width', type=int, default=None)
    p.add_argument('--frame-stride', dest='frame_stride', type=int, default=None)
    p.add_argument('--fps', type=float, default=None)
    p.add_argument('--resize-mode', dest='resize_mode', choices=('cover', 'stretch'), default=None)
    p.add_argument('--resize-shrink', dest='resize_shrink', choices=('area', 'linear'), default=None)
    p.add_argument('--on-short', dest='on_short', choices=('error', 'pad'), default=None)
    p.add_argument('--negative-prompt', dest='negative_prompt', default=None)
    p.add_argument('--cache-dtype', dest='cache_dtype', choices=('float32', 'bfloat16', 'float16'),
                   default=None)
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--task-options', dest='task_options', default=None,
                   help='JSON object of task option defaults')
    p.add_argument('--vae-type', dest='vae_type', default=None,
                   help='TinyWanVAE or WanVideoVAE')
    p.add_argument('--vae-checkpoint', dest='vae_checkpoint', default=None)
    p.add_argument('--text-encoder-type', dest='text_type', default=None,
                   help='TinyTextEncoder or WanTextEncoder')
    p.add_argument('--text-encoder-checkpoint', dest='text_checkpoint', default=None)
    p.add_argument('--tokenizer', default=None, help='local umT5 tokenizer folder (WanTextEncoder)')
    p.add_argument('--device', default=None, help='cpu or cuda[:i]')
    p.add_argument('--batch-size', dest='batch_size', type=int, default=1)
    p.add_argument('--workers', type=int, default=0,
                   help='DataLoader processes decoding videos and building VCUs (0 = here)')
    p.add_argument('--skip-bad', dest='skip_bad', action='store_true')
    p.add_argument('--log-every', dest='log_every', type=float, default=10.0,
                   help='seconds between progress lines')
    args = p.parse_args(argv)
    if args.manifest_pos and args.manifest and args.manifest_pos != args.manifest:
        p.error('give the manifest once (positional or --manifest)')
    args.manifest = args.manifest or args.manifest_pos
    return args


def dataset_config(args) -> dict:
    """Dataset kwargs: the config's dataset entry, overridden by given flags."""
    cfg: Dict[str, object] = {}
    if args.config:
        from mmengine.config import Config
        full = Config.fromfile(args.config)
        ds = full.get('train_dataloader', {}).get('dataset')
        if ds is None:
            raise ValueError(f'{args.config}: no train_dataloader.dataset entry')
        ds = ds.to_dict() if hasattr(ds, 'to_dict') else dict(ds)
        if ds.pop('type', 'VCUManifestDataset') != 'VCUManifestDataset':
            raise ValueError(f'{args.config}: train_dataloader.dataset is not a VCUManifestDataset')
        cfg.update(ds)
    for name in DATASET_FLAGS:
        value = getattr(args, name)
        if value is not None:
            cfg[name] = value
    if args.task_options:
        cfg['task_options'] = json.loads(args.task_options)
    codec = dict(cfg.get('codec') or {})
    vae = dict(codec.get('vae') or {})
    text = dict(codec.get('text_encoder') or {})
    if args.vae_type:
        vae['type'] = args.vae_type
    if args.vae_checkpoint:
        vae['checkpoint'] = args.vae_checkpoint
    if args.text_type:
        text['type'] = args.text_type
    if args.text_checkpoint:
        text['checkpoint'] = args.text_checkpoint
    if args.tokenizer:
        text['tokenizer'] = args.tokenizer
    codec.update(vae=vae, text_encoder=text)
    if args.device:
        codec['device'] = args.device
    missing = [n for n, v in (('--vae-type', vae.get('type')), ('--vae-checkpoint', vae.get('checkpoint')),
                              ('--text-encoder-type', text.get('type')),
                              ('--text-encoder-checkpoint', text.get('checkpoint'))) if not v]
    if missing:
        raise ValueError(f'precompute_vcu: the codecs are not fully given; missing {missing}')
    cfg['codec'] = codec
    if not cfg.get('manifest') or str(cfg['manifest']).startswith('???'):
        raise ValueError('precompute_vcu: no manifest (positional argument or --manifest)')
    if not cfg.get('cache_dir'):
        raise ValueError('precompute_vcu: --cache-dir is required')
    cfg['on_error'] = 'skip' if args.skip_bad else 'raise'
    return cfg


class _PixelJobs:
    """Map-style view: index → (index, VCUPixels or None, error message or None)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from vdot_ext.patches.video_reader import VCUInputError
        try:
            return index, self.dataset.build_pixels(index), None
        except VCUInputError as exc:
            return index, None, str(exc)


def _as_list(batch):
    return list(batch)


def precompute(dataset, batch_size: int = 1, skip_bad: bool = False,
               log_every: float = 10.0, workers: int = 0) -> dict:
    """Encode every uncached sample of ``dataset`` into its cache (pixels built in
    ``workers`` DataLoader processes, encoded in this one). Returns a summary."""
    from vdot_ext.patches.video_reader import VCUInputError
    start = time.perf_counter()
    todo: Dict[int, List[int]] = defaultdict(list)
    cached = 0
    for index in range(len(dataset)):
        path = dataset.cache_path(index)
        if path is not None and os.path.isfile(path):
            cached += 1
        else:
            todo[dataset.shape_key(index)].append(index)
    total = sum(len(v) for v in todo.values())
    logger.info(f'precompute_vcu: {len(dataset)} samples, {cached} already cached, {total} to '
                f'encode into {dataset.cache_subdir}')
    done = skipped = 0
    errors: Dict[str, str] = dict(dataset.bad_samples)
    last_log = start
    chunks = [indices[lo:lo + batch_size] for _, indices in sorted(todo.items())
              for lo in range(0, len(indices), batch_size)]
    # pixels (decode + VCU build) in `workers` processes, encoding here
    loader = torch.utils.data.DataLoader(_PixelJobs(dataset), batch_sampler=chunks,
                                         num_workers=workers, collate_fn=_as_list)
    for chunk in loader:
        good, pixels = [], []
        for index, built, error in chunk:  # bad inputs are per sample, not per batch
            if error is None:
                good.append(index)
                pixels.append(built)
                continue
            if not skip_bad:
                raise VCUInputError(error)
            errors[dataset.sample_id(index)] = error
            skipped += 1
            logger.warning(f'precompute_vcu: skipping bad sample: {error}')
        if not good:
            continue
        for index, tensors in zip(good, dataset.encode_pixels(good, pixels)):
            try:
                dataset.save_cached(index, tensors)  # refuses NaN/Inf encodings
            except VCUInputError as exc:
                if not skip_bad:
                    raise
                errors[dataset.sample_id(index)] = str(exc)
                skipped += 1
                logger.warning(f'precompute_vcu: skipping bad sample: {exc}')
                continue
            done += 1
        now = time.perf_counter()
        if now - last_log >= log_every or done + skipped == total:
            rate = done / max(now - start, 1e-9)
            eta = (total - done - skipped) / rate if rate > 0 else float('nan')
            logger.info(f'precompute_vcu: {done}/{total} encoded ({skipped} skipped), '
                        f'{rate:.2f} samples/s, ETA {eta:.0f}s')
            last_log = now
    seconds = time.perf_counter() - start
    summary = dict(samples=len(dataset), cached_before=cached, encoded=done,
                   skipped=skipped + len(dataset.manifest_errors), seconds=round(seconds, 3),
                   cache_dir=dataset.cache_subdir, errors=errors)
    counts = json.dumps({k: v for k, v in summary.items() if k != 'errors'})
    logger.info(f'precompute_vcu: done in {seconds:.1f}s: {counts}')
    if errors:
        logger.warning(f'precompute_vcu: {len(errors)} sample(s) skipped; the first: '
                       f'{" | ".join(list(errors.values())[:3])} (all in the summary\'s "errors")')
    return summary


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    logger.setLevel(logging.INFO)
    import vdot_ext.patches  # noqa: F401  (registers the dataset)
    from vdot_ext.patches.vcu_dataset import VCUManifestDataset
    dataset = VCUManifestDataset(**dataset_config(args))
    return precompute(dataset, batch_size=max(1, args.batch_size), skip_bad=args.skip_bad,
                      log_every=args.log_every, workers=max(0, args.workers))


if __name__ == '__main__':
    summary = main()
    sys.exit(1 if summary['encoded'] == 0 and summary['cached_before'] == 0 else 0)
