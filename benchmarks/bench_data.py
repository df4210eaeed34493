"""VCU data-path throughput: 81 × 480 × 832 training samples from mp4, with and without cache.

    python benchmarks/bench_data.py [--work-dir /tmp/vcu_bench] [--samples-per-task 2]
                                    [--src-height 480 --src-width 832] [--workers 2]

What is timed (wall clock, after one warm-up sample per task):

* **uncached, per worker** — ``dataset.get_vcu(i)`` in this process with one
  thread everywhere (torch, OpenCV, decord): decode the mp4(s) with decord, sample
  81 frames, resize/crop, build F/M/refs for the task, convert to float tensors
  ``[3, 81, 480, 832]`` (video, frames) and ``[1, 81, 480, 832]`` (masks). This is
  all a DataLoader worker does before the Wan VAE; the VAE itself runs on the GPU
  (``tools/precompute_vcu.py`` or on-the-fly codecs) and is not included, so an
  uncached epoch is at least this slow.
* **uncached, DataLoader** — the same over ``--workers`` worker processes
  (samples/s of the whole loader, tasks without optical flow).
* **cached** — ``dataset[i]`` from the safetensors cache: context ``[512, 4096]``
  (umT5 length/width), latents ``[16, 21, 60, 104]``, vace_context
  ``[96, 21, 60, 104]``, float32, with the per-file checks (hashes, shapes, finite
  values). The cache files are written through ``VCUManifestDataset.save_cached``
  with random tensors of the real shapes (what is timed is reading, not encoding).

Source videos: procedural textured scenes with moving shapes, H.264 (crf 18),
97 frames at 16 fps, ``--src-height × --src-width`` (default 480 × 832; 720 × 1280
exercises the resize).
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..')))

TASKS = ('depth', 'pose', 'grey', 'scribble', 'outpaint', 'extension', 'reference', 't2v',
         'firstframe_depth', 'firstframe_grey', 'reference_scribble', 'reference_pose',
         'flow', 'firstframe_flow', 'reference_flow')


def render_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a smooth random texture panning + two moving discs."""
    rng = np.random.default_rng(seed)
    import cv2
    big = rng.integers(0, 255, (height // 8 + 40, width // 8 + 40 + num_frames, 3), np.uint8)
    big = cv2.resize(big, (big.shape[1] * 8, big.shape[0] * 8), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frame = big[40:40 + height, t * 2:t * 2 + width].copy()
        for k, colour in enumerate(((250, 40, 40), (40, 220, 250))):
            cx = width * (0.2 + 0.6 * ((t / num_frames + 0.3 * k) % 1.0))
            cy = height * (0.35 + 0.3 * k)
            frame[(xx - cx)**2 + (yy - cy)**2 < (0.12 * height)**2] = colour
        out[t] = frame
    return out


def write_sources(work: str, src_h: int, src_w: int, per_task: int, num_frames: int = 97):
    from vdot_ext.data.video_io import write_mp4, write_png
    os.makedirs(work, exist_ok=True)
    rows = []
    n_videos = 3
    for v in range(n_videos):
        path = os.path.join(work, f'video{v}_{src_h}x{src_w}.mp4')
        cond = os.path.join(work, f'depth{v}_{src_h}x{src_w}.mp4')
        if not os.path.isfile(path) or not os.path.isfile(cond):
            video = render_video(num_frames, src_h, src_w, v)
            write_mp4(path, video, fps=16, crf=18)
            grey = video.mean(axis=-1, keepdims=True).astype(np.uint8)
            write_mp4(cond, np.repeat(255 - grey, 3, axis=-1), fps=16, crf=18)
    ref = os.path.join(work, 'ref.png')
    if not os.path.isfile(ref):
        write_png(ref, np.random.default_rng(0).integers(0, 255, (400, 300, 3), np.uint8))
    k = 0
    for task in TASKS:
        for j in range(per_task):
            v = k % n_videos
            row = dict(id=f'{task}_{j}', task=task, prompt='two discs over a moving texture',
                       video=f'video{v}_{src_h}x{src_w}.mp4')
            if 'depth' in task or 'pose' in task:
                row['condition'] = f'depth{v}_{src_h}x{src_w}.mp4'
            if task.startswith('reference'):
                row['ref_images'] = ['ref.png']
            rows.append(row)
            k += 1
    manifest = os.path.join(work, f'manifest_{src_h}x{src_w}.jsonl')
    with open(manifest, 'w') as handle:
        for row in rows:
            handle.write(json.dumps(row) + '\n')
    return manifest


def time_uncached(ds, indices, fn):
    """{task: [(wall s, cpu s), ...]} of ``fn(i)``."""
    per_task = {}
    for i in indices:
        task = ds.rows[i].task
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(i)
        per_task.setdefault(task, []).append((time.perf_counter() - w0, time.process_time() - c0))
        del out
    return per_task


def summarise(per_task):
    rates = {}
    for task, times in per_task.items():
        wall = sum(t[0] for t in times)
        cpu = sum(t[1] for t in times)
        rates[task] = (len(times) / wall, len(times) / cpu)
    return rates


def pooled(per_task, keep):
    times = [t for task, ts in per_task.items() if keep(task) for t in ts]
    if not times:
        return None
    return len(times) / sum(t[0] for t in times), len(times) / sum(t[1] for t in times)


def _collate_first(batch):
    return batch[0]['task']


class _PixelView(torch.utils.data.Dataset):
    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        import cv2
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        p = self.ds.build_pixels(self.indices[k])
        return dict(task=p.task, video=p.video, frames=p.frames, masks=p.masks)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--work-dir', default='/tmp/vcu_bench')
    p.add_argument('--samples-per-task', type=int, default=2)
    p.add_argument('--src-height', type=int, default=480)
    p.add_argument('--src-width', type=int, default=832)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--cached-samples', type=int, default=12)
    p.add_argument('--skip-loader', action='store_true')
    p.add_argument('--resize-shrink', default='area', choices=('area', 'linear'))
    args = p.parse_args(argv)
    import cv2
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    from vdot_ext.patches.vcu_dataset import VCUManifestDataset

    print(f'# machine: {platform.processor() or platform.machine()}, nproc={os.cpu_count()}, '
          f'sched_getaffinity={len(os.sched_getaffinity(0))}, load avg={os.getloadavg()}')
    t0 = time.perf_counter()
    manifest = write_sources(args.work_dir, args.src_height, args.src_width, args.samples_per_task)
    print(f'# sources ready in {time.perf_counter() - t0:.1f}s: {manifest}')

    # ---- uncached pixel path, one worker (this process, one thread)
    # a codec config is needed to construct without a cache; it is never used here
    from vdot_ext.models.tiny_codecs import TinyTextEncoder, TinyWanVAE
    codec_dir = os.path.join(args.work_dir, 'codecs')
    os.makedirs(codec_dir, exist_ok=True)
    vae_path, te_path = os.path.join(codec_dir, 'vae.pth'), os.path.join(codec_dir, 'te.pth')
    if not os.path.isfile(vae_path):
        TinyWanVAE().save(vae_path)
        TinyTextEncoder(vocabulary=['a']).save(te_path)
    codec = dict(vae=dict(type='TinyWanVAE', checkpoint=vae_path),
                 text_encoder=dict(type='TinyTextEncoder', checkpoint=te_path))
    ds = VCUManifestDataset(manifest, num_frames=81, height=480, width=832, codec=codec,
                            resize_shrink=args.resize_shrink)
    warm = {}
    for i, row in enumerate(ds.rows):
        warm.setdefault(row.task, i)
    for i in warm.values():  # warm-up: first decode, imports
        ds.get_vcu(i)
    results = dict(nproc=os.cpu_count(), load_before=os.getloadavg(), src=[args.src_height, args.src_width])
    t0 = time.perf_counter()
    compact = time_uncached(ds, range(len(ds)), ds.build_pixels)
    results['uncached_epoch_seconds'] = time.perf_counter() - t0
    floats = time_uncached(ds, range(len(ds)), ds.get_vcu)
    a, b = summarise(compact), summarise(floats)
    print('\nuncached, one worker (1 thread), samples/s as wall-clock (CPU-time) rate:')
    print('| task | VCU pixels, uint8 (what a worker ships) | + float tensors on CPU |')
    print('|---|---|---|')
    for task in a:
        print(f'| {task} | {a[task][0]:.2f} ({a[task][1]:.2f}) | {b[task][0]:.2f} ({b[task][1]:.2f}) |')
    results['uncached_per_task'] = dict(compact=a, float=b)
    for name, per in (('compact', compact), ('float', floats)):
        no_flow = pooled(per, lambda t: 'flow' not in t)
        flow = pooled(per, lambda t: 'flow' in t)
        results[f'uncached_{name}_no_flow'] = no_flow
        results[f'uncached_{name}_flow'] = flow
        print(f'{name}: tasks without flow {no_flow[0]:.2f} ({no_flow[1]:.2f} CPU) samples/s; '
              f'flow tasks {flow[0]:.2f} ({flow[1]:.2f} CPU) samples/s')
    total = results['uncached_epoch_seconds']
    print(f'uncached epoch (uint8 VCU pixels) of {len(ds)} samples: {total:.1f}s')

    # ---- uncached through a DataLoader with several workers
    if not args.skip_loader and args.workers > 0:
        idx = [i for i, r in enumerate(ds.rows) if 'flow' not in r.task]
        loader = torch.utils.data.DataLoader(_PixelView(ds, idx), batch_size=1,
                                             num_workers=args.workers, collate_fn=_collate_first,
                                             prefetch_factor=1, persistent_workers=False)
        t0 = time.perf_counter()
        n = sum(1 for _ in loader)
        dt = time.perf_counter() - t0
        results['loader_no_flow'] = n / dt
        print(f'uncached DataLoader, {args.workers} workers, tasks without flow: {n / dt:.2f} '
              f'samples/s ({n} samples in {dt:.1f}s, incl. worker start-up)')

    # ---- cached: real-size tensors in the cache, timed reads
    cache_dir = os.path.join(args.work_dir, 'cache')
    dsc = VCUManifestDataset(manifest, num_frames=81, height=480, width=832, codec=codec,
                             cache_dir=cache_dir)
    n_cached = min(args.cached_samples, len(dsc))
    gen = torch.Generator().manual_seed(0)
    for i in range(n_cached):
        if not os.path.isfile(dsc.cache_path(i)):
            f = 21 + dsc.rows[i].num_ref
            dsc.save_cached(i, dict(context=torch.randn(512, 4096, generator=gen),
                                    latents=torch.randn(16, f, 60, 104, generator=gen),
                                    vace_context=torch.randn(96, f, 60, 104, generator=gen)))
    dsc_cache_only = VCUManifestDataset(manifest, num_frames=81, height=480, width=832,
                                        cache_dir=cache_dir)
    dsc_cache_only.load_cached(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(n_cached):
        item = dsc_cache_only[i]
        assert item['vace_context'].shape[0] == 96
    dt = time.perf_counter() - t0
    results['cached'] = n_cached / dt
    results['load_after'] = os.getloadavg()
    size = sum(os.path.getsize(dsc.cache_path(i)) for i in range(n_cached)) / n_cached / 2**20
    print(f'cached: {n_cached / dt:.1f} samples/s per worker ({size:.0f} MiB per sample file, '
          'page-cache warm)')
    # what a DataLoader adds: the batch copy (default_collate stacks the
    # memory-mapped tensors into new ones)
    from torch.utils.data import default_collate
    t0 = time.perf_counter()
    for i in range(n_cached):
        batch = default_collate([dsc_cache_only[i]])
        assert batch['vace_context'].shape[1] == 96
    results['cached_collated'] = n_cached / (time.perf_counter() - t0)
    print(f'cached + default_collate (batch copy): {results["cached_collated"]:.1f} samples/s')
    uncached_all = len(ds) / results['uncached_epoch_seconds']
    print(f'cached epoch vs uncached epoch (uint8 pixels only, no VAE): '
          f'{results["cached"] / uncached_all:.1f}× faster')
    results['speedup'] = results['cached'] / uncached_all
    results['speedup_collated'] = results['cached_collated'] / uncached_all
    print(f'  with the batch copy: {results["speedup_collated"]:.1f}× faster')
    from vdot_ext.utils import write_json
    write_json(os.path.join(args.work_dir, f'results_{args.src_height}x{args.src_width}_{args.resize_shrink}.json'),
               results, indent=1)
    return results


if __name__ == '__main__':
    main()
