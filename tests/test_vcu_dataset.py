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
from vdot_ext.utils import NonFiniteError

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


def ids(sample_ids):
    """The manifest ids of ``'<id> (<file> line <n>)'`` sample ids."""
    return {s.split(' (')[0] for s in sample_ids}


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
    assert isinstance(err.value, NonFiniteError)  # what the training guard and loaders raise
    # opt-in skip: replaced by another sample with the same shape, counted, logged once
    skipping = VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=cache,
                                  on_error='skip')
    with caplog.at_level(logging.WARNING):
        first, second = skipping[1], skipping[1]
    assert first['sample_id'] == second['sample_id'] == 's3 (cache.jsonl line 4)'
    assert first['num_ref'] == 0
    assert skipping.num_skipped == 1 and ids(skipping.bad_samples) == {'s1'}
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
    assert ds.num_skipped == 4 and ids(ds.bad_samples) == {'noref', 'unknown', 'noprompt', 'nodepth'}
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
    assert {it['sample_id'] for it in items} == {'good (bad.jsonl line 1)'}
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
    assert ids(summary['errors']) == {r['id'] for r in rows} - {'good'}


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


# ---------------------------------------------------------------- skip mode never aborts
def test_skip_mode_survives_a_shape_group_that_is_all_bad(env, caplog):
    """Both 1-reference samples have a corrupt video: their batch is served by the
    0-reference group (deterministically, one group per batch) and collates."""
    from mmengine.dataset import DefaultSampler, default_collate

    from vdot_ext.data.batch_samplers import ShapeGroupedBatchSampler
    rows = [dict(id='g0', task='grey'), dict(id='g1', task='t2v'),
            dict(id='r0', task='reference', video='corrupt.mp4', ref_images=['ref.png']),
            dict(id='r1', task='reference', video='corrupt.mp4', ref_images=['ref.png'])]
    path = manifest(env, 'dead.jsonl', rows)
    strict = VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'])
    with pytest.raises(VCUInputError, match='corrupt') as err:
        strict[2]
    assert 'corrupt.mp4' in str(err.value) and "'video'" in str(err.value) and 'dead.jsonl line 3' in str(err.value)
    ds = VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'], on_error='skip')
    sampler = ShapeGroupedBatchSampler(DefaultSampler(ds, shuffle=False), batch_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=default_collate)
    with caplog.at_level(logging.WARNING):
        batches = list(loader) + list(loader)  # two epochs: the bad ones are not retried
    assert len(batches) == 4 and all(b['vace_context'].shape == (2, 96, 3, H // 8, W // 8) for b in batches)
    assert [b['sample_id'] for b in batches[:2]] == [['g0 (dead.jsonl line 1)', 'g1 (dead.jsonl line 2)']] * 2
    assert ds.num_skipped == 2 and ids(ds.bad_samples) == {'r0', 'r1'}
    assert sum('every sample with shape key 1 is bad' in r.message for r in caplog.records) == 1
    assert sum('skipping bad sample' in r.message for r in caplog.records) == 2
    assert 'corrupt.mp4' in ds.skip_report()
    # every sample bad: one clear error, not a hang or an IndexError
    dead = VCUManifestDataset(manifest(env, 'alldead.jsonl', rows[2:]), num_frames=T, height=H, width=W,
                              codec=env['codec'], on_error='skip')
    with pytest.raises(VCUInputError, match='every sample of the manifest is bad') as err:
        dead[0]
    assert 'alldead.jsonl' in str(err.value) and 'corrupt.mp4' in str(err.value)


def test_skip_mode_counts_bad_manifest_rows_once(env, caplog):
    lines = [json.dumps(dict(id='ok', task='grey', prompt='a red square', video='gt.mp4')),
             '{"id": "broken", "task": "grey", "prompt": "x" "video": "gt.mp4"}',
             json.dumps(dict(id='num', task='grey', prompt=7, video='gt.mp4')),
             json.dumps(dict(id='nan', task='grey', prompt='x', video='gt.mp4', frame_end=float('nan')))]
    path = env['dir'] / 'rows.jsonl'
    path.write_bytes(('\n'.join(lines) + '\n').encode() + b'{"id": "latin", "task": "grey", "prompt": "\xe9t\xe9", '
                     b'"video": "gt.mp4"}\n')
    with pytest.raises(VCUInputError, match="line 2.*field 'prompt'.*not valid JSON"):
        VCUManifestDataset(str(path), num_frames=T, height=H, width=W, codec=env['codec'])
    with caplog.at_level(logging.WARNING):
        ds = VCUManifestDataset(str(path), num_frames=T, height=H, width=W, codec=env['codec'], on_error='skip')
    assert len(ds) == 1 and ds.num_skipped == 4 and [e.line for e in ds.manifest_errors] == [2, 3, 4, 5]
    assert [e.field for e in ds.manifest_errors] == ['prompt', 'prompt', 'frame_end', 'prompt']
    assert len(ds.bad_samples) == 4 and len(caplog.records) == 1 and '4 row(s) skipped' in caplog.records[0].message
    assert ds[0]['sample_id'] == 'ok (rows.jsonl line 1)'


# ---------------------------------------------------------------- cache and codec files
def test_cache_key_covers_the_condition_version(env, monkeypatch, caplog):
    from vdot_ext.patches import tasks
    path = manifest(env, 'cv.jsonl', GOOD_ROWS[:2])
    cache = str(env['dir'] / 'cache_cv')
    writer = VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'], cache_dir=cache)
    writer[0]
    assert VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=cache).load_cached(0) is not None
    monkeypatch.setattr(tasks, 'CONDITION_VERSION', tasks.CONDITION_VERSION + 1)
    with pytest.raises(ValueError, match='condition_version') as err:
        VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=cache)
    assert 'python -m vdot_ext.tools.precompute_vcu' in str(err.value) and 'rebuild' in str(err.value)
    with caplog.at_level(logging.WARNING):
        fresh = VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'], cache_dir=cache)
    assert fresh.cache_subdir != writer.cache_subdir and fresh.load_cached(0) is None
    assert any('VCU conditions version' in r.message and 'Not used' in r.message for r in caplog.records)
    fresh[0]
    assert fresh.num_encoded == 1


def test_cache_writes_are_atomic(env, monkeypatch):
    from vdot_ext.patches.vcu_cache import NonFiniteSampleError
    path = manifest(env, 'atomic.jsonl', GOOD_ROWS[:2])
    ds = VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'],
                            cache_dir=str(env['dir'] / 'cache_atomic'))
    f = (T - 1) // 4 + 1  # random tensors of the right shapes: what is tested is the writing
    encoded = dict(context=torch.randn(8, 16), latents=torch.randn(16, f, H // 8, W // 8),
                   vace_context=torch.randn(96, f, H // 8, W // 8))
    ds.save_cached(0, encoded)
    before = sorted(os.listdir(ds.cache_subdir))
    assert before == sorted(['config.json', os.path.basename(ds.cache_path(0))])

    def crash(*args):  # the process dies between writing and renaming
        raise OSError('simulated crash before the rename')
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(OSError, match='simulated crash'):
        ds.save_cached(1, encoded)
    monkeypatch.undo()
    assert sorted(os.listdir(ds.cache_subdir)) == before  # no torn file, no temporary left behind
    encoded['latents'][0, 0, 0, 0] = float('inf')
    with pytest.raises(NonFiniteSampleError, match="1 NaN/Inf values in 'latents'; not caching"):
        ds.save_cached(1, encoded)
    assert sorted(os.listdir(ds.cache_subdir)) == before
    # torn files (written by something else) are errors that name them
    with open(ds.cache_path(0), 'r+b') as handle:
        handle.truncate(100)
    with pytest.raises(VCUInputError, match='unreadable cache file') as err:
        ds.load_cached(0)
    assert ds.cache_path(0) in str(err.value)
    config = os.path.join(ds.cache_subdir, 'config.json')
    with open(config, 'w') as handle:
        handle.write('{"pixel_config": ')
    with pytest.raises(ValueError, match='unreadable') as err:
        VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=str(env['dir'] / 'cache_atomic'))
    assert config in str(err.value) and 'delete its folder' in str(err.value)


def test_cache_only_sample_missing_from_the_cache(env):
    """A sample that precompute skipped has no file: an error saying how to
    build it, or (skip mode) a counted skip."""
    path = manifest(env, 'partial.jsonl', GOOD_ROWS[:2])
    cache = str(env['dir'] / 'cache_partial')
    VCUManifestDataset(path, num_frames=T, height=H, width=W, codec=env['codec'], cache_dir=cache)[0]
    strict = VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=cache)
    with pytest.raises(VCUInputError, match='no cache entry and no codec') as err:
        strict[1]
    assert 'precompute_vcu' in str(err.value) and 'partial.jsonl line 2' in str(err.value)
    skipping = VCUManifestDataset(path, num_frames=T, height=H, width=W, cache_dir=cache, on_error='skip')
    assert skipping[1]['sample_id'] == 's0 (partial.jsonl line 1)' and skipping.num_skipped == 1


class NotATensor:  # pickled into a "checkpoint": loading it would need to run code
    pass


def test_codec_weights_load_through_the_safe_loader(env, tmp_path):
    from vdot_ext.patches.vcu_codecs import VCUCodecs, load_codec_state
    from vdot_ext.utils import NonFiniteError, UnsafeCheckpointError
    payload = torch.load(env['codec']['vae']['checkpoint'], weights_only=True)
    name = next(iter(payload['state_dict']))
    payload['state_dict'][name] = torch.full_like(payload['state_dict'][name], float('nan'))
    torch.save(payload, tmp_path / 'nan_vae.pth')
    torch.save(dict(payload, extra=NotATensor()), tmp_path / 'pickle_vae.pth')
    for file, error, match in (('nan_vae.pth', NonFiniteError, name), ('pickle_vae.pth', UnsafeCheckpointError,
                                                                       'NotATensor')):
        codecs = VCUCodecs(dict(type='TinyWanVAE', checkpoint=str(tmp_path / file)), env['codec']['text_encoder'])
        with pytest.raises(error, match=match) as err:
            codecs.vae
        assert str(tmp_path / file) in str(err.value) and 'codec.vae.checkpoint' in str(err.value)
    # a codec fault is not a bad sample: skip mode does not hide it
    rows_path = manifest(env, 'codecfault.jsonl', GOOD_ROWS[:1])
    nan_vae = dict(type='TinyWanVAE', checkpoint=str(tmp_path / 'nan_vae.pth'))
    ds = VCUManifestDataset(rows_path, num_frames=T, height=H, width=W, on_error='skip',
                            codec=dict(env['codec'], vae=nan_vae))
    with pytest.raises(NonFiniteError, match='nan_vae.pth'):
        ds[0]
    # the full-size codecs' files (safetensors or .pth) go through the same checks
    from safetensors.torch import save_file as save_st
    save_st({'w': torch.tensor([1.0, float('inf')])}, str(tmp_path / 'enc.safetensors'))
    with pytest.raises(NonFiniteError, match='enc.safetensors'):
        load_codec_state(str(tmp_path / 'enc.safetensors'), 'codec.text_encoder.checkpoint')
    save_st({'w': torch.ones(2)}, str(tmp_path / 'ok.safetensors'))
    assert load_codec_state(str(tmp_path / 'ok.safetensors'), 'x', torch.bfloat16)['w'].dtype == torch.bfloat16
