"""Synthetic VCU dataset (Table 1 semantics through patches.tasks, encoding, cache) and video file I/O."""
import logging
import os

import numpy as np
import pytest
import torch

from vdot_ext.data.synthetic_videos import (
    COLOURS,
    TASKS,
    SyntheticVideoDataset,
    caption_vocabulary,
    prepare_tiny_codecs,
    render_scene,
    sample_scene,
    scene_caption,
    vcu_pixels,
)
from vdot_ext.data.video_io import (
    read_png,
    read_video,
    side_by_side,
    uint8_to_video,
    video_to_uint8,
    write_mp4,
    write_png,
)
from vdot_ext.models.tiny_codecs import TinyTextEncoder, TinyWanVAE, WordTokenizer
from vdot_ext.patches import tasks as vcu_tasks
from vdot_ext.patches.vcu import encode_vcu
from vdot_ext.utils import NonFiniteError, safe_torch_load, save_torch

T, H, W = 5, 32, 64  # decord reads widths ≥ 64 only
N = 8  # two samples per task


@pytest.fixture(scope='module')
def codecs(tmp_path_factory):
    root = tmp_path_factory.mktemp('codecs')
    vae = TinyWanVAE(dim=8, seed=0)
    vae.set_latent_scale(torch.linspace(-0.2, 0.2, 16), torch.linspace(0.8, 1.2, 16))
    vae_path = vae.save(str(root / 'vae.pth'))
    text_path = TinyTextEncoder(caption_vocabulary(), max_length=16, dim=32).save(str(root / 'text.pth'))
    return dict(vae_checkpoint=vae_path, text_encoder_checkpoint=text_path, vae=vae,
                other_vae=TinyWanVAE(dim=8, seed=1).save(str(root / 'vae_other.pth')))


LOGGER = logging.getLogger('vdot_test_synthetic')


def _build(tmp, codecs, **kw):
    args = dict(logger=LOGGER, num_samples=N, num_frames=T, height=H, width=W, seed=3,
                data_root=str(tmp / 'data'), vae_checkpoint=codecs['vae_checkpoint'],
                text_encoder_checkpoint=codecs['text_encoder_checkpoint'])
    args.update(kw)
    return SyntheticVideoDataset(**args)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, codecs):
    return _build(tmp_path_factory.mktemp('ds'), codecs)


def test_task_cycle_and_item_layout(dataset):
    assert len(dataset) == N
    f_lat = (T - 1) // 4 + 1
    for i in range(N):
        item = dataset[i]
        assert item['task'] == TASKS[i % 4] and item['index'] == i
        assert isinstance(item['sample_id'], str) and item['sample_id'] == dataset.sample_id(i)
        assert dataset.video_path(i).endswith(item['sample_id'] + '.mp4')
        n_ref = 1 if item['task'] == 'r2v' else 0
        assert item['num_ref'] == n_ref
        assert item['context'].shape == (16, 32)
        assert item['latents'].shape == (16, n_ref + f_lat, H // 8, W // 8)
        assert item['vace_context'].shape == (96, n_ref + f_lat, H // 8, W // 8)
        assert item['prompt'] == scene_caption(sample_scene(3, i))


def test_table1_t2v(dataset):
    p = dataset.get_pixels(0)
    assert p['task'] == 't2v' and p['ref_images'] is None
    assert p['frames'].shape == (3, T, H, W) and torch.all(p['frames'] == 0)  # grey
    assert p['masks'].shape == (1, T, H, W) and torch.all(p['masks'] == 1)  # generate all
    assert p['video'].abs().max() > 0.1


def test_table1_r2v(dataset):
    p = dataset.get_pixels(1)
    assert p['task'] == 'r2v'
    assert torch.all(p['frames'] == 0) and torch.all(p['masks'] == 1)
    ref = p['ref_images']
    assert ref.shape == (3, 1, H, W)
    object_px = (ref < 1 - 1e-3).any(0)
    assert 0.02 < object_px.float().mean() < 0.5  # an object on white (VACE's reference canvas)
    assert torch.all(ref[:, 0, 0, 0] == 1) and torch.all(ref[:, 0, -1, -1] == 1)  # white corners
    # the object's colour is the caption's colour
    centre = (ref[:, 0, H // 2, W // 2] + 1) / 2
    base = torch.tensor(COLOURS[p['scene']['colour']])
    dark = 0.45 * base + 0.05
    assert min((centre - base).abs().max(), (centre - dark).abs().max()) < 0.35
    # encoded: reference latent prepended to the video latents; its VACE mask frame is zero
    item = dataset[1]
    vae = TinyWanVAE.load(dataset.vae_checkpoint)
    assert torch.allclose(item['latents'][:, :1], vae.encode(ref[None])[0], atol=1e-5)
    assert torch.allclose(item['latents'][:, 1:], vae.encode(p['video'][None])[0], atol=1e-5)
    assert torch.all(item['vace_context'][64:, 0] == 0)
    assert torch.all(item['vace_context'][32:, 1:] == 1)
    assert torch.all(item['vace_context'][16:32, 0] == 0)


def test_table1_v2v_gray(dataset):
    p = dataset.get_pixels(2)
    assert p['task'] == 'v2v_gray' and p['canonical_task'] == 'grey' and p['ref_images'] is None
    assert torch.all(p['masks'] == 1)
    # VACE's grey (BGR2GRAY on RGB), rounded to uint8 levels
    grey = 0.114 * p['video'][0] + 0.587 * p['video'][1] + 0.299 * p['video'][2]
    for c in range(3):
        assert torch.allclose(p['frames'][c], grey, atol=1 / 127.5 + 1e-6)
    bt601 = 0.299 * p['video'][0] + 0.587 * p['video'][1] + 0.114 * p['video'][2]
    assert (p['frames'][0] - bt601).abs().max() > 4 / 127.5  # not BT.601


def test_table1_mv2v_outpaint(dataset):
    p = dataset.get_pixels(3)
    assert p['task'] == 'mv2v_outpaint' and p['ref_images'] is None
    # VACE's video outpainting default: expand_ratio 0.25 on left and right, per side:
    # a source of 64/1.5 columns plus ⌊64·0.25/1.5⌋ = 10 on each side; no rows
    bw = 10
    m = p['masks'][0]
    assert torch.all(m[:, :, :bw] == 1) and torch.all(m[:, :, -bw:] == 1)
    assert torch.all(m[:, :, bw:W - bw] == 0)
    border = m.bool().expand(3, -1, -1, -1)
    assert torch.all(p['frames'][border] == 0)  # grey where generated
    assert torch.equal(p['frames'][~border], p['video'][~border])  # source kept


def test_task_options_reach_the_patches_builders(tmp_path, codecs):
    ds = _build(tmp_path, codecs, num_samples=1, tasks=('mv2v_outpaint', ), write_files=False,
                task_options=dict(expand_ratio=0.5, direction=['left', 'up']))
    m = ds.get_pixels(0)['masks'][0, 0]
    # expand: ⌊64·0.5/1.5⌋ = 21 columns on the left, ⌊32·0.5/1.5⌋ = 10 rows on top
    assert m[0].eq(1).nonzero().numel() == W and m[:, 0].eq(1).all()
    assert m[10:, 21:].eq(0).all() and m[10:, 20].eq(1).all() and m[9, 21:].eq(1).all()
    with pytest.raises(ValueError, match='expand_ratio'):
        _build(tmp_path, codecs, num_samples=1, tasks=('mv2v_outpaint', ),
               task_options=dict(expand_ratio=-1))
    with pytest.raises(ValueError, match="replaced by VACE's 'expand_ratio'"):
        _build(tmp_path, codecs, num_samples=1, tasks=('mv2v_outpaint', ),
               task_options=dict(outpaint_ratio=0.5))


def test_vace_context_is_encode_vcu_of_pixels(dataset, codecs):
    vae = TinyWanVAE.load(dataset.vae_checkpoint)
    for i in (0, 2, 3):
        p = dataset.get_pixels(i)
        expected = encode_vcu(vae, p['frames'][None], p['masks'][None])[0]
        assert torch.allclose(dataset[i]['vace_context'], expected, atol=1e-5)
    # context = text encoder of the caption (zero past its length)
    text = TinyTextEncoder.load(dataset.text_encoder_checkpoint)
    assert torch.allclose(dataset[0]['context'], text.encode([dataset[0]['prompt']])[0], atol=1e-6)


def test_deterministic_per_seed(tmp_path, dataset, codecs):
    same = _build(tmp_path / 'a', codecs, write_files=False)
    assert same.prompts == dataset.prompts
    for i in range(N):
        assert torch.equal(same.get_pixels(i)['video'], dataset.get_pixels(i)['video'])
        assert torch.equal(same[i]['latents'], dataset[i]['latents'])
    other = _build(tmp_path / 'b', codecs, seed=4, write_files=False)
    assert other.prompts != dataset.prompts
    assert not torch.equal(other.get_pixels(0)['video'], dataset.get_pixels(0)['video'])


def test_captions_describe_scene_in_vocabulary():
    tok = WordTokenizer(caption_vocabulary(), max_length=16)
    for i in range(200):
        scene = sample_scene(0, i)
        caption = scene_caption(scene)
        assert scene['colour'] in caption and scene['shape'] in caption
        assert f"moving {scene['direction']}" in caption and scene['background'] in caption
        ids, mask = tok(caption, return_mask=True)
        assert 2 not in ids[0].tolist()  # no <unk>
        assert mask.sum() < 16  # never truncated


def test_motion_follows_caption():
    for i in range(12):
        scene = dict(sample_scene(0, i), texture='plain')
        video, _ = render_scene(scene, 9, 64, 64)
        ref_colour = torch.tensor(COLOURS[scene['colour']]).view(3, 1, 1) * 2 - 1
        centres = []
        for t in (0, 8):
            hit = ((video[:, t] - ref_colour).abs().max(0).values < 0.05).float()
            ys, xs = torch.nonzero(hit, as_tuple=True)
            centres.append((xs.float().mean(), ys.float().mean()))
        dx, dy = centres[1][0] - centres[0][0], centres[1][1] - centres[0][1]
        expected = {'left': dx < -8, 'right': dx > 8, 'up': dy < -8, 'down': dy > 8}
        assert expected[scene['direction']], (scene, dx, dy)


def test_cache_reuse_and_mismatch(tmp_path, codecs, caplog):
    caplog.set_level(logging.INFO)
    first = _build(tmp_path, codecs, write_files=False)
    assert first.num_encoded == N and os.path.isfile(first.cache_path)
    mtime = os.path.getmtime(first.cache_path)
    second = _build(tmp_path, codecs, write_files=False)
    assert second.num_encoded == 0  # cache hit: nothing re-encoded
    assert os.path.getmtime(first.cache_path) == mtime
    assert 'reusing encoded cache' in caplog.text
    for i in range(N):
        assert torch.equal(first[i]['vace_context'], second[i]['vace_context'])
    # other codec weights → other key → re-encoded, with a logged reason
    caplog.clear()
    third = _build(tmp_path, codecs, write_files=False, vae_checkpoint=codecs['other_vae'])
    assert third.num_encoded == N and third.cache_path != first.cache_path
    assert 'no cache file' in caplog.text
    assert not torch.allclose(third[0]['latents'], first[0]['latents'])
    # a cache file that does not belong to its key is an error, not silently used
    payload = safe_torch_load(first.cache_path)
    payload['cache_key'] = 'something else'
    save_torch(payload, first.cache_path)
    with pytest.raises(ValueError, match='does not match'):
        _build(tmp_path, codecs, write_files=False)


def test_cache_key_covers_the_condition_version(tmp_path, codecs, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    first = _build(tmp_path, codecs, num_samples=2, write_files=False)
    monkeypatch.setattr(vcu_tasks, 'CONDITION_VERSION', vcu_tasks.CONDITION_VERSION + 1)
    caplog.clear()
    newer = _build(tmp_path, codecs, num_samples=2, write_files=False)
    assert newer.cache_path != first.cache_path and newer.num_encoded == 2  # old cache refused
    assert 'no cache file' in caplog.text


def test_nonfinite_cache_is_an_error_naming_the_file(tmp_path, codecs):
    first = _build(tmp_path, codecs, num_samples=2, write_files=False)
    payload = safe_torch_load(first.cache_path)
    payload['latents'][1][0, 0, 0, 0] = float('nan')
    save_torch(payload, first.cache_path)
    with pytest.raises(NonFiniteError, match='latents.1') as err:
        _build(tmp_path, codecs, num_samples=2, write_files=False)
    assert first.cache_path in str(err.value)
    # the cache is written atomically: no temporary file is left beside it
    assert os.listdir(os.path.dirname(first.cache_path)) == [os.path.basename(first.cache_path)]


def test_conditions_come_from_patches_tasks():
    """One vocabulary: the demo's names are aliases, the pixels patches' builders."""
    from vdot_ext.data.video_io import video_to_uint8
    scene = sample_scene(0, 5)
    video, ref = render_scene(scene, T, H, W)
    for demo, task in (('v2v_gray', 'grey'), ('mv2v_outpaint', 'outpaint'), ('r2v', 'reference'),
                       ('t2v', 't2v')):
        assert vcu_tasks.resolve_task(demo) == (task, {})
        a, b = vcu_pixels(demo, video, ref), vcu_pixels(task, video, ref)
        assert a['canonical_task'] == task and torch.equal(a['frames'], b['frames'])
        assert torch.equal(a['masks'], b['masks'])
    grey = vcu_tasks.build_vcu('grey', vcu_tasks.SourceSample('x', video_to_uint8(video)))
    assert torch.equal(vcu_pixels('v2v_gray', video, ref)['frames'], grey.frames_tensor())
    # any task a rendered video can give: black-on-white scribbles, first frame + grey
    scribble = vcu_pixels('scribble', video, ref)['frames']
    assert float(scribble.mean()) > 0.5 and bool((scribble < 0).any())
    first = vcu_pixels('firstframe_grey', video, ref)
    assert torch.all(first['masks'][:, 0] == 0) and torch.all(first['masks'][:, 1:] == 1)


def test_extension_modes_drawn_per_sample_and_deterministic(tmp_path, codecs):
    kw = dict(num_samples=8, tasks=('extension', ), write_files=False, with_vace_context=False,
              task_options=dict(extension_mode={'firstclip': 1, 'lastframe': 1}))
    a, b = _build(tmp_path / 'a', codecs, **kw), _build(tmp_path / 'b', codecs, **kw)
    modes = [a.get_pixels(i)['info']['extension_mode'] for i in range(8)]
    assert set(modes) == {'firstclip', 'lastframe'}
    assert modes == [b.get_pixels(i)['info']['extension_mode'] for i in range(8)]
    for i, mode in enumerate(modes):
        kept = a.get_pixels(i)['info']['kept_frames']
        assert kept == ([0, 1] if mode == 'firstclip' else [T - 1])  # clip (5 − 1)/4 + 1 = 2


def test_t2v_only_without_vace_context(tmp_path, codecs):
    ds = _build(tmp_path, codecs, num_samples=3, tasks=('t2v', ), with_vace_context=False,
                write_files=False)
    for i in range(3):
        item = ds[i]
        assert item['task'] == 't2v' and 'vace_context' not in item
        assert item['latents'].shape == (16, 2, H // 8, W // 8)


def test_bad_configuration_errors(tmp_path, codecs):
    for task, match in (('depth', 'depth model'), ('inpaint', 'mask or box'),
                        ('clipref', 'firstclip'), ('levitate', 'unknown task')):
        with pytest.raises(ValueError, match=match):
            _build(tmp_path, codecs, tasks=(task, ))
    with pytest.raises(TypeError, match='outpaint_ratio'):
        _build(tmp_path, codecs, outpaint_ratio=0.25)
    with pytest.raises(ValueError, match='num_frames'):
        _build(tmp_path, codecs, num_frames=6)
    with pytest.raises(ValueError, match='multiples of 16'):
        _build(tmp_path, codecs, height=40)
    with pytest.raises(FileNotFoundError, match='vae_checkpoint'):
        _build(tmp_path, codecs, vae_checkpoint=str(tmp_path / 'missing.pth'))
    ds = _build(tmp_path, codecs, num_samples=1, write_files=False)
    with pytest.raises(IndexError):
        ds[1]


def test_files_written_and_readable(dataset):
    for i in range(N):
        frames = read_video(dataset.video_path(i))
        assert frames.shape == (T, H, W, 3)
        err = np.abs(frames.astype(np.float32) - video_to_uint8(dataset.get_pixels(i)['video']))
        assert err.mean() < 8  # lossy H.264, same content
    ref = read_png(dataset.reference_path(1))
    assert ref.shape == (H, W, 3)
    assert ref[0, 0].tolist() == [255, 255, 255]  # white background (VACE's reference canvas)
    index_file = os.path.join(os.path.dirname(dataset.video_path(0)), 'index.jsonl')
    assert sum(1 for _ in open(index_file)) == N + 1


def test_registered_in_datasets(tmp_path, codecs):
    from vdot_ext.registry import DATASETS
    ds = DATASETS.build(dict(type='SyntheticVideoDataset', num_samples=2, num_frames=T, height=H,
                             width=W, data_root=str(tmp_path), write_files=False,
                             vae_checkpoint=codecs['vae_checkpoint'],
                             text_encoder_checkpoint=codecs['text_encoder_checkpoint']))
    assert isinstance(ds, SyntheticVideoDataset) and len(ds) == 2


def test_prepare_tiny_codecs_trains_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    kw = dict(num_frames=5, height=32, width=32, num_train_videos=4, vae_steps=2,
              vae_batch_size=2)
    kw['logger'] = LOGGER
    out = prepare_tiny_codecs(str(tmp_path), **kw)
    assert os.path.isfile(out['vae_checkpoint']) and os.path.isfile(out['text_encoder_checkpoint'])
    assert out['text_dim'] == 32 and 'final_recon_psnr' in out['metrics']['vae']
    assert 'training the tiny VAE' in caplog.text
    mtime = os.path.getmtime(out['vae_checkpoint'])
    caplog.clear()
    again = prepare_tiny_codecs(str(tmp_path), **kw)
    assert again['vae_checkpoint'] == out['vae_checkpoint']
    assert os.path.getmtime(out['vae_checkpoint']) == mtime
    assert 'reusing trained VAE' in caplog.text
    caplog.clear()
    prepare_tiny_codecs(str(tmp_path), **dict(kw, vae_steps=3))
    assert 'another config' in caplog.text
    vae = TinyWanVAE.load(out['vae_checkpoint'])
    assert vae.encode(torch.zeros(1, 3, 5, 32, 32)).shape == (1, 16, 2, 4, 4)


def test_prepare_tiny_codecs_registered_as_function(tmp_path):
    from vdot_ext.registry import FUNCTIONS
    assert FUNCTIONS.get('prepare_tiny_codecs') is prepare_tiny_codecs


# -- video_io ---------------------------------------------------------------
def test_mp4_roundtrip_decord(tmp_path):
    g = torch.Generator().manual_seed(0)
    low = torch.rand(3, 9, 4, 8, generator=g) * 2 - 1
    video = torch.nn.functional.interpolate(low[None], size=(9, 32, 64), mode='trilinear')[0]
    path = write_mp4(str(tmp_path / 'v.mp4'), video, fps=8)
    frames = read_video(path)
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 64, 3)
    back = uint8_to_video(frames)
    assert (back - video).abs().mean() < 0.06  # H.264 + 4:2:0 chroma on random colours
    assert np.abs(read_video(path, backend='imageio').astype(int) - frames).mean() < 2
    # uint8 THWC input too; narrow frames: decord refuses clearly, imageio reads them
    narrow = write_mp4(str(tmp_path / 'u.mp4'), video_to_uint8(video[..., :48]))
    with pytest.raises(ValueError, match='narrower than 64'):
        read_video(narrow)
    assert read_video(narrow, backend='imageio').shape == (9, 32, 48, 3)
    with pytest.raises(ValueError, match='even'):
        write_mp4(str(tmp_path / 'odd.mp4'), torch.zeros(3, 2, 15, 16))
    with pytest.raises(FileNotFoundError):
        read_video(str(tmp_path / 'missing.mp4'))


def test_png_and_side_by_side(tmp_path):
    image = torch.linspace(-1, 1, 3 * 16 * 16).view(3, 16, 16)
    path = write_png(str(tmp_path / 'i.png'), image[:, None])
    back = read_png(path)
    assert back.shape == (16, 16, 3)
    assert np.abs(back.astype(int) - video_to_uint8(image[:, None])[0].astype(int)).max() == 0
    video = torch.zeros(3, 5, 16, 16)
    grid = side_by_side([video, image[:, None], video], labels=['a', 'b', 'c'], pad=2,
                        label_height=12)
    assert grid.shape == (5, 12 + 16, 3 * 16 + 2 * 2, 3)
    assert np.all(grid[:, 12:, 16:18] == 255)  # white separator
    assert np.all(grid[:, 12:, 18:34] == video_to_uint8(image[:, None]))  # image repeated over time
    with pytest.raises(ValueError, match='frame counts'):
        side_by_side([video, torch.zeros(3, 9, 16, 16)])
