"""VCUManifestDataset end to end on real mp4/png files with the tiny codecs:
equality with diffsynth's own VACE unit, the batched encoder and host patch,
the precompute tool and cache checks, bad samples (raise / skip), batching."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vdot_ext.data.video_io import write_mp4, write_png
from vdot_ext.models.tiny_codecs import TinyTextEncoder, TinyWanVAE
from vdot_ext.patches import host_patch
from vdot_ext.patches.vcu_dataset import VCUManifestDataset
from vdot_ext.patches.video_reader import VCUInputError
from vdot_ext.tools.precompute_vcu import main as precompute_main

T, H, W = 9, 48, 64
VOCAB = ['a', 'red', 'square', 'moving', 'on', 'grass', 'blurry']
PATCHED_AT_IMPORT = host_patch.is_vace_batch_patch_applied()


def render(seed, frames=13):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (H // 8, W // 8 + frames, 3), np.uint8).repeat(8, 0).repeat(8, 1)
    return np.stack([base[:, t:t + W] for t in range(frames)])


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp('vcu_ds')
    write_mp4(str(d / 'gt.mp4'), render(0))
    write_mp4(str(d / 'depth.mp4'), render(1))
    write_mp4(str(d / 'short.mp4'), render(0, frames=5))
    write_mp4(str(d / 'big_mask.mp4'), np.zeros((13, 64, 80, 3), np.uint8))
    (d / 'corrupt.mp4').write_bytes(os.urandom(3000))
    write_png(str(d / 'ref.png'), np.random.default_rng(3).integers(0, 255, (40, 30, 3), np.uint8))
    TinyWanVAE(dim=8, seed=0).save(str(d / 'vae.pth'))
    TinyTextEncoder(vocabulary=VOCAB, max_length=8).save(str(d / 'te.pth'))
    codec = dict(vae=dict(type='TinyWanVAE', checkpoint=str(d / 'vae.pth')),
                 text_encoder=dict(type='TinyTextEncoder', checkpoint=str(d / 'te.pth')))
    return dict(dir=d, codec=codec)


def manifest(env, name, rows):
    path = env['dir'] / name
    with open(path, 'w') as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps(dict(dict(id=f's{i}', prompt='a red square moving',
                                              video='gt.mp4'), **row)) + '\n')
    return str(path)


GOOD_ROWS = [dict(task='depth', condition='depth.mp4'),
             dict(task='outpaint'),
             dict(task='reference_grey', ref_images=['ref.png']),
             dict(task='firstframe', prompt='a square on grass')]


def diffsynth_vace(vae, vcu):
    """diffsynth 2.1.12's own WanVideoUnit_VACE (batch 1) on the same pixels.

    Frames go in as float arrays in [0, 255] (diffsynth's preprocess maps them
    with x·2/255 − 1), so grey 127.5 is represented exactly."""
    from diffsynth.pipelines.wan_video import WanVideoPipeline, WanVideoUnit_VACE
    pipe = WanVideoPipeline(device='cpu', torch_dtype=torch.float32)
    pipe.vae = vae.wan_vae
    to255 = lambda x: ((x + 1) * 127.5).permute(1, 2, 3, 0).numpy()  # noqa: E731
    frames = list(to255(vcu['frames']))
    masks = list(vcu['masks'].expand(3, -1, -1, -1).permute(1, 2, 3, 0).numpy() * 255.0)
    refs = None
    if vcu['ref_images'] is not None:
        refs = list(to255(vcu['ref_images']))
    out = WanVideoUnit_VACE().process(pipe, frames, masks, refs, 1.0, H, W, T, False, None, None)
    return out['vace_context'][0]


def test_encoded_samples_equal_diffsynth_vace_unit(env):
    ds = VCUManifestDataset(manifest(env, 'good.jsonl', GOOD_ROWS), num_frames=T, height=H,
                            width=W, codec=env['codec'])
    vae = TinyWanVAE.load(env['codec']['vae']['checkpoint'])
    text = TinyTextEncoder.load(env['codec']['text_encoder']['checkpoint'])
    for i in range(len(ds)):
        item = ds[i]
        vcu = ds.get_vcu(i)
        n_ref = vcu['num_ref']
        f = n_ref + (T - 1) // 4 + 1
        assert item['vace_context'].shape == (96, f, H // 8, W // 8)
        assert item['latents'].shape == (16, f, H // 8, W // 8) and item['num_ref'] == n_ref
        expected = diffsynth_vace(vae, vcu)
        torch.testing.assert_close(item['vace_context'], expected, atol=1e-4, rtol=1e-4)
        # real-video latents, reference latents prepended
        torch.testing.assert_close(item['latents'][:, n_ref:], vae.encode(vcu['video'][None])[0],
                                   atol=1e-5, rtol=1e-5)
        if n_ref:
            torch.testing.assert_close(item['latents'][:, :n_ref],
                                       vae.encode(vcu['ref_images'][:, :1][None])[0], atol=1e-5,
                                       rtol=1e-5)
        torch.testing.assert_close(item['context'], text.encode([ds.rows[i].prompt])[0])
        assert item['task'] == ds.rows[i].task and 'negative_context' not in item
    assert ds.num_encoded == len(ds)


def test_batched_encoder_and_host_patch(env):
    assert not PATCHED_AT_IMPORT  # importing vdot_ext.patches patches nothing
    rows = [dict(task='grey'), dict(task='extension'), dict(task='reference', ref_images=['ref.png']),
            dict(task='reference_pose', condition='depth.mp4', ref_images=['ref.png'])]
    ds = VCUManifestDataset(manifest(env, 'batch.jsonl', rows), num_frames=T, height=H, width=W,
                            codec=env['codec'], negative_prompt='blurry')
    for pair in ([0, 1], [2, 3]):
        batched = ds.encode_indices(pair)
        for k, i in enumerate(pair):
            single = ds.encode_indices([i])[0]
            for key in ('context', 'latents', 'vace_context', 'negative_context'):
                torch.testing.assert_close(batched[k][key], single[key], atol=1e-5, rtol=1e-5)
    assert ds[0]['negative_context'].shape == ds[0]['context'].shape
    # host patch: diffsynth's unit takes the tensor batch and gives the same contexts
    from diffsynth.pipelines.wan_video import WanVideoPipeline, WanVideoUnit_VACE
    pipe = WanVideoPipeline(device='cpu', torch_dtype=torch.float32)
    pipe.vae = TinyWanVAE.load(env['codec']['vae']['checkpoint']).wan_vae
    vcus = [ds.get_vcu(i) for i in (2, 3)]
    frames = torch.stack([v['frames'] for v in vcus])
    masks = torch.stack([v['masks'] for v in vcus])
    refs = torch.stack([v['ref_images'] for v in vcus])
    assert host_patch.apply_vace_batch_patch() is True
    try:
        assert host_patch.apply_vace_batch_patch() is False  # idempotent
        out = WanVideoUnit_VACE().process(pipe, frames, masks, refs, 1.0, H, W, T, False, None, None)
        expected = torch.stack([ds.encode_indices([i])[0]['vace_context'] for i in (2, 3)])
        torch.testing.assert_close(out['vace_context'], expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match='no silent truncation'):
            WanVideoUnit_VACE().process(pipe, frames, masks, refs, 1.0, H, W, T - 4, False, None, None)
        # PIL-style input still goes to diffsynth's own code
        single = diffsynth_vace(TinyWanVAE.load(env['codec']['vae']['checkpoint']), vcus[0])
        torch.testing.assert_close(single, expected[0], atol=1e-4, rtol=1e-4)
    finally:
        assert host_patch.remove_vace_batch_patch() is True
    assert not host_patch.is_vace_batch_patch_applied()
    assert host_patch.check_host_version()[0].startswith('2.1.')


def test_precompute_tool_cache_checks_and_nan(env, caplog):
    path = manifest(env, 'cache.jsonl', GOOD_ROWS)
    cache = str(env['dir'] / 'cache')
    vae, te = env['codec']['vae']['checkpoint'], env['codec']['text_encoder']['checkpoint']
    argv = [path, '--cache-dir', cache, '--num-frames', str(T), '--height', str(H), '--width',
            str(W), '--vae-type', 'TinyWanVAE', '--vae-checkpoint', vae, '--text-encoder-type',
            'TinyTextEncoder', '--text-encoder-checkpoint', te, '--batch-size', '2', '--workers', '1']
    summary = precompute_main(argv)
    assert summary['encoded'] == 4 and summary['cached_before'] == 0 and summary['skipped'] == 0
    again = precompute_main(argv)
    assert again['encoded'] == 0 and again['cached_before'] == 4
    # cache only (no codec): same tensors as encoding on the fly
    cached = VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=cache)
    fresh = VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'])
    for i in (0, 2):
        a, b = cached[i], fresh[i]
        for key in ('context', 'latents', 'vace_context'):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    assert cached.num_encoded == 0
    # another configuration: refused, naming what differs
    with pytest.raises(ValueError, match="num_frames") as err:
        VCUManifestDataset(path, num_frames=5, height=H, width=W, cache_dir=cache)
    assert 'precompute_vcu' in str(err.value)
    with pytest.raises(ValueError, match='neither cache_dir nor codec'):
        VCUManifestDataset(path, num_frames=T, height=H, width=W)
    # NaN in a cached tensor: a clear error naming the file and the tensor
    victim = cached.cache_path(1)
    with safe_open(victim, framework='pt') as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors['vace_context'][0, 0, 0, 0] = float('nan')
    save_file(tensors, victim, metadata=meta)
    with pytest.raises(VCUInputError, match='NaN') as err:
        cached[1]
    assert victim in str(err.value) and "'vace_context'" in str(err.value)
    # opt-in skip: replaced by another sample with the same shape, counted, logged once
    skipping = VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=cache,
                                  on_error='skip')
    with caplog.at_level(logging.WARNING):
        first, second = skipping[1], skipping[1]
    assert first['sample_id'] == second['sample_id'] != 's1' and first['num_ref'] == 0
    assert skipping.num_skipped == 1 and 's1' in skipping.bad_samples
    assert sum('skipping bad sample' in r.message for r in caplog.records) == 1


def test_bad_samples_raise_or_are_skipped(env, caplog):
    rows = [dict(id='good', task='grey'),
            dict(id='corrupt', task='grey', video='corrupt.mp4'),
            dict(id='short', task='grey', video='short.mp4'),
            dict(id='maskmismatch', task='outpaint', mask='big_mask.mp4'),
            dict(id='lenmismatch', task='depth', condition='short.mp4'),
            dict(id='noref', task='reference', ref_images=['gone.png']),
            dict(id='unknown', task='levitate'),
            dict(id='noprompt', task='grey', prompt=''),
            dict(id='nodepth', task='depth')]
    path = manifest(env, 'bad.jsonl', rows)
    with pytest.raises(VCUInputError, match='no such file') as err:
        VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'])
    assert 'gone.png' in str(err.value) and "'ref_images'" in str(err.value)
    with caplog.at_level(logging.WARNING):
        ds = VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'],
                                on_error='skip')
    assert ds.num_skipped == 4 and set(ds.bad_samples) >= {'noref', 'unknown', 'noprompt', 'nodepth'}
    assert [r.sample_id for r in ds.rows] == ['good', 'corrupt', 'short', 'maskmismatch', 'lenmismatch']
    # per-sample errors (strict: pixels of each bad sample)
    expectations = {'corrupt': ('corrupt', 'corrupt.mp4', "'video'"),
                    'short': ('too few frames', 'short.mp4', "'video'"),
                    'maskmismatch': ('size mismatch', 'big_mask.mp4', "'mask'"),
                    'lenmismatch': ('length mismatch', 'short.mp4', "'condition'")}
    for i, row in enumerate(ds.rows[1:], start=1):
        match, file, field = expectations[row.sample_id]
        with pytest.raises(VCUInputError, match=match) as err:
            ds.build_pixels(i)
        assert file in str(err.value) and field in str(err.value) and row.sample_id in str(err.value)
    # skip mode: every bad index yields the good sample
    items = [ds[i] for i in range(len(ds))]
    assert {it['sample_id'] for it in items} == {'good'}
    assert ds.num_skipped == 8 and ds.num_encoded == 1 + 4  # 'good' is re-encoded per access
    strict = VCUManifestDataset(manifest(env, 'strict.jsonl', rows[:2]), num_frames=T, height=H,
                                width=W, codec=env['codec'])
    with pytest.raises(VCUInputError, match='corrupt'):
        strict[1]
    # the precompute tool: stops at the first bad sample, or skips and counts them
    vae, te = env['codec']['vae']['checkpoint'], env['codec']['text_encoder']['checkpoint']
    argv = [path, '--cache-dir', str(env['dir'] / 'cache_bad'), '--num-frames', str(T), '--height',
            str(H), '--width', str(W), '--vae-type', 'TinyWanVAE', '--vae-checkpoint', vae,
            '--text-encoder-type', 'TinyTextEncoder', '--text-encoder-checkpoint', te]
    with pytest.raises(VCUInputError):
        precompute_main(argv)
    summary = precompute_main(argv + ['--skip-bad'])
    assert summary['encoded'] == 1 and summary['skipped'] == 8
    assert set(summary['errors']) == {r['id'] for r in rows} - {'good'}


def test_shape_grouped_batches_and_registry(env):
    from mmengine.dataset import DefaultSampler, default_collate
    from vdot_ext.data.batch_samplers import ShapeGroupedBatchSampler
    from vdot_ext.registry import DATASETS
    rows = [dict(task='grey'), dict(task='reference', ref_images=['ref.png']), dict(task='t2v'),
            dict(task='reference_scribble', ref_images=['ref.png', 'ref.png']),
            dict(task='reference', ref_images=['ref.png'])]
    path = manifest(env, 'mixed.jsonl', rows)
    ds = DATASETS.build(dict(type='VCUManifestDataset', manifest=path, num_frames=T, height=H,
                             width=W, codec=env['codec'], cache_dir=str(env['dir'] / 'cache2')))
    assert isinstance(ds, VCUManifestDataset)
    assert [ds.shape_key(i) for i in range(len(ds))] == [0, 1, 0, 2, 1]
    sampler = ShapeGroupedBatchSampler(DefaultSampler(ds, shuffle=False), batch_size=2)
    batches = list(sampler)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 4]]
    for batch in batches:
        collated = default_collate([ds[i] for i in batch])
        n = collated['num_ref'][0].item()
        assert collated['vace_context'].shape == (2, 96, n + 3, H // 8, W // 8)
        assert collated['latents'].shape == (2, 16, n + 3, H // 8, W // 8)
    # written to the cache on the way
    assert all(os.path.isfile(ds.cache_path(i)) for b in batches for i in b)
    with open(os.path.join(ds.cache_subdir, 'config.json')) as handle:
        stored = json.load(handle)
    assert stored['pixel_config']['num_frames'] == T and stored['codec']['vae']['type'] == 'TinyWanVAE'
