"""Every task's F / M / references per Table 1 of the VDOT paper (after VACE),
from real mp4/png files, against computations made here from the decoded files.

Conventions checked: frames in [-1, 1] with grey 127.5 ≙ 0 for missing pixels,
masks 1 = generate, references fitted on a white canvas and prepended, VACE's
grey (BGR2GRAY weights on RGB), black-on-white scribbles, per-side expand_ratio.
The values VACE's own formulas give are pinned in test_vace_conventions.py.
"""
import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vdot_ext.data.video_io import read_png, read_video, write_mp4, write_png
from vdot_ext.patches import conditions as C
from vdot_ext.patches.tasks import TASKS, UVCBENCH_TASKS, SourceSample, build_vcu
from vdot_ext.patches.vcu_dataset import VCUManifestDataset
from vdot_ext.patches.video_reader import VCUInputError

T, H, W = 17, 48, 64  # clip; source files are 21 frames of 48 × 64
VACE_GREY = np.array([0.114, 0.587, 0.299])  # vace/annotators/gray.py: BGR2GRAY on RGB


def render(seed, frames=21):
    """Texture panning right by 2 px/frame with a bright square (edges for scribble)."""
    rng = np.random.default_rng(seed)
    tex = cv2.resize(rng.integers(0, 255, (H // 4, (W + 2 * frames) // 4, 3), np.uint8),
                     (W + 2 * frames, H), interpolation=cv2.INTER_CUBIC)
    out = []
    for t in range(frames):
        f = tex[:, 2 * frames - 2 * t:2 * frames - 2 * t + W].copy()
        f[12:36, 20:44] = (240, 240, 240)
        out.append(f)
    return np.stack(out)


@pytest.fixture(scope='module')
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp('vcu_tasks')
    write_mp4(str(d / 'gt.mp4'), render(0), fps=8)
    write_mp4(str(d / 'depth.mp4'), render(1), fps=8)
    mask = np.zeros((21, H, W, 3), np.uint8)
    mask[:, 10:30, 5:25] = 255
    write_mp4(str(d / 'mask.mp4'), mask, fps=8)
    write_png(str(d / 'ref.png'), np.random.default_rng(2).integers(0, 255, (30, 20, 3), np.uint8))
    return dict(dir=d, gt=read_video(str(d / 'gt.mp4'))[:T], depth=read_video(str(d / 'depth.mp4'))[:T],
                mask=read_video(str(d / 'mask.mp4'))[:T, ..., 0] > 127, ref=read_png(str(d / 'ref.png')))


def dataset(src, rows, **kw):
    import json
    path = src['dir'] / f'm{abs(hash(json.dumps(rows, sort_keys=True))) % 10**8}.jsonl'
    with open(path, 'w') as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps(dict(dict(id=f's{i}', prompt='a square', video='gt.mp4'), **row)) + '\n')
    kw = dict(dict(num_frames=T, height=H, width=W, pixels_only=True), **kw)
    return VCUManifestDataset(str(path), **kw)


def one(src, row, **kw):
    return dataset(src, [row], **kw).get_vcu(0)


def unit(u8):
    """uint8 [T, H, W, 3] → float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(u8.astype(np.float32)).permute(3, 0, 1, 2) / 127.5 - 1


def luma(u8):
    """VACE's grey of uint8 RGB frames, as float [3, T, H, W] in [-1, 1]."""
    y = (u8.astype(np.float64) * VACE_GREY).sum(-1)
    return torch.from_numpy(np.repeat(y[..., None], 3, -1).astype(np.float32)).permute(3, 0, 1, 2) / 127.5 - 1


def assert_v2v(vcu, expected_frames, src, atol=1e-6):
    np.testing.assert_allclose(vcu['video'], unit(src['gt']), atol=1e-6)
    np.testing.assert_allclose(vcu['frames'], expected_frames, atol=atol)
    assert vcu['masks'].shape == (1, T, H, W) and bool((vcu['masks'] == 1).all())


def test_registry_has_every_uvcbench_task():
    assert set(UVCBENCH_TASKS) <= set(TASKS) and len(UVCBENCH_TASKS) == 18
    cats = {name: spec.category for name, spec in TASKS.items()}
    assert cats['t2v'] == 't2v' and cats['reference'] == 'r2v' and cats['outpaint'] == 'mv2v'
    assert all(cats[f'{a}_{c}'] == 'composite' for a in ('firstframe', 'reference')
               for c in ('depth', 'pose', 'flow', 'grey', 'scribble'))


def test_t2v(src):
    vcu = one(src, dict(task='t2v'))
    assert bool((vcu['frames'] == 0).all()) and bool((vcu['masks'] == 1).all())
    assert vcu['ref_images'] is None and vcu['num_ref'] == 0


@pytest.mark.parametrize('task', ['depth', 'pose'])
def test_depth_pose_use_the_manifest_condition(src, task):
    vcu = one(src, dict(task=task, condition='depth.mp4'))
    assert_v2v(vcu, unit(src['depth']), src)


def test_grey(src):
    vcu = one(src, dict(task='grey'))
    # OpenCV's fixed point of VACE's BGR2GRAY-on-RGB is within one uint8 level of
    # 0.114 R + 0.587 G + 0.299 B
    assert_v2v(vcu, luma(src['gt']), src, atol=1 / 127.5 + 1e-6)
    assert bool((vcu['frames'][0] == vcu['frames'][1]).all())
    # a precomputed grey video in the manifest is used as is
    vcu = one(src, dict(task='gray', condition='depth.mp4'))
    assert_v2v(vcu, unit(src['depth']), src)


def test_scribble_is_black_lines_on_white(src):
    vcu = one(src, dict(task='scribble'))
    frames = vcu['frames']
    assert set(torch.unique(frames).tolist()) <= {-1.0, 1.0}
    assert float(frames.mean()) > 0.5  # mostly white paper (VACE's scribble polarity)
    edges = frames[0] < 0  # black lines
    expected = np.stack([cv2.Canny(cv2.GaussianBlur(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (3, 3), 0),
                                   100, 200) > 0 for f in src['gt']])
    np.testing.assert_array_equal(edges.numpy(), expected)
    # the bright square's outline is an edge in every frame
    assert all(bool(edges[t, 12:36, 19:22].any()) and bool(edges[t, 11:14, 20:44].any()) for t in range(T))


def test_flow_colour_wheel_definition():
    # Middlebury wheel (RY 15, YG 6, GC 4, CB 11, BM 13, MR 6): unit flow → wheel colour
    one_px = np.zeros((1, 3, 2))
    one_px[0, 0] = (1, 0)      # right
    one_px[0, 1] = (-1, 0)     # left
    one_px[0, 2] = (0, 1)      # down
    col = C.flow_to_color(one_px)
    # right: atan2(−0, −1) = −π → wheel[0], pure red (as RAFT's flow_viz)
    assert col[0, 0].tolist() == [255, 0, 0]
    assert col[0, 1].tolist() == [0, 209, 255]      # wheel[27] (CB, k = 2)
    assert col[0, 2].tolist() == [255, 229, 0]      # between wheel[13] and wheel[14] (RY)
    up = C.flow_to_color(np.array([[[0.0, -3.0]]]))
    assert up[0, 0].tolist() == [88, 0, 255]        # between wheel[40] and wheel[41] (BM)
    assert C.flow_to_color(np.zeros((2, 2, 2))).tolist() == [[[255] * 3] * 2] * 2  # no motion: white
    wheel = C.make_colorwheel()
    assert wheel.shape == (55, 3) and wheel[0].tolist() == [255, 0, 0]


def test_flow_task_renders_farneback_motion(src):
    vcu = one(src, dict(task='flow'))
    frames = vcu['frames']
    np.testing.assert_array_equal(frames[:, 0], frames[:, 1])  # first flow repeated (VACE)
    flows = C.farneback_flows(src['gt'])  # 48×64 ≤ 256: full resolution
    assert flows.shape == (T - 1, H, W, 2)
    # the texture pans right by 2 px/frame (the static square aside)
    background = np.ones((H, W), bool)
    background[8:40, 16:48] = False
    u = np.median(flows[:, 16:40, 4:60][..., 0][:, background[16:40, 4:60]])
    assert 1.5 < u < 2.5
    # rendered colour of rightward motion: red/magenta side of the wheel
    rgb = ((frames[:, 1:, 16:40, 4:12] + 1) * 127.5).reshape(3, -1).median(dim=1).values
    assert rgb[0] > 180 and rgb[1] < 100, rgb
    np.testing.assert_allclose(((frames[:, 5] + 1) * 127.5).round().numpy(),
                               C.flow_to_color(flows[4]).transpose(2, 0, 1), atol=0)


def test_reference_fit_on_white_canvas(src):
    vcu = one(src, dict(task='reference', ref_images=['ref.png']))
    assert bool((vcu['frames'] == 0).all()) and bool((vcu['masks'] == 1).all())
    refs = vcu['ref_images']
    assert refs.shape == (3, 1, H, W) and vcu['num_ref'] == 1
    # VACE fit: s = min(48/30, 64/20) = 1.6 → 48 × 32, centred at column 16
    x = torch.from_numpy(src['ref'].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    inner = F.interpolate(x[None], size=(48, 32), mode='bilinear', align_corners=False)[0]
    np.testing.assert_allclose(refs[:, 0, :, 16:48], inner, atol=1e-6)
    assert bool((refs[:, 0, :, :16] == 1).all()) and bool((refs[:, 0, :, 48:] == 1).all())
    grey_pad = one(src, dict(task='reference', ref_images=['ref.png'], options=dict(ref_fill=0.0)))
    assert bool((grey_pad['ref_images'][:, 0, :, :16] == 0).all())
    two = one(src, dict(task='reference', ref_images=['ref.png', 'ref.png']))
    assert two['ref_images'].shape == (3, 2, H, W) and two['num_ref'] == 2


def test_reference_crop_by_box(src):
    vcu = one(src, dict(task='reference', ref_box=[16, 8, 48, 40], ref_frame=3))
    crop = src['gt'][3, 8:40, 16:48]  # 32 × 32 → scale 1.5 → 48 × 48 at column 8
    x = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    inner = F.interpolate(x[None], size=(48, 48), mode='bilinear', align_corners=False)[0]
    np.testing.assert_allclose(vcu['ref_images'][:, 0, :, 8:56], inner, atol=1e-6)
    assert bool((vcu['ref_images'][:, 0, :, :8] == 1).all())


def test_outpaint(src):
    vcu = one(src, dict(task='outpaint'))
    # VACE's video default: expand_ratio 0.25 on left and right of a source s wide, canvas
    # s·1.5 = 64 → ⌊64·0.25/1.5⌋ = 10 columns per side, no rows
    expected = torch.ones(1, T, H, W)
    expected[:, :, :, 10:54] = 0
    assert torch.equal(vcu['masks'], expected)
    np.testing.assert_allclose(vcu['frames'], unit(src['gt']) * (1 - expected), atol=1e-6)
    # manifest columns in VACE's names; 'outpainting_inner' greys ⌊0.5·64⌋ = 32 columns in place
    left = one(src, dict(task='outpainting_inner', expand_ratio=0.5, direction=['left']))
    expected = torch.zeros(1, T, H, W)
    expected[..., :32] = 1
    assert torch.equal(left['masks'], expected)
    assert bool((left['frames'][..., :32] == 0).all())
    np.testing.assert_allclose(left['frames'][..., 32:], unit(src['gt'])[..., 32:], atol=1e-6)
    # the same ratio as VACE's canvas expansion: the source is 64/1.5 wide, ⌊64·0.5/1.5⌋ = 21
    expand = one(src, dict(task='outpainting', expand_ratio=0.5, direction='left'))
    assert expand['masks'][0, 0, 0].eq(1).nonzero().flatten().tolist() == list(range(21))
    # per side, and the retired option name is refused with the way out
    sides = one(src, dict(task='outpaint', options=dict(expand_ratio=dict(up=0.5, right=0.25))))
    # up: ⌊48·0.5/1.5⌋ = 16 rows; right: ⌊64·0.25/1.25⌋ = 12 columns
    assert sides['masks'][0, 0, :, 0].eq(1).nonzero().flatten().tolist() == list(range(16))
    assert sides['masks'][0, 0, -1].eq(1).nonzero().flatten().tolist() == list(range(52, 64))
    with pytest.raises(VCUInputError, match="replaced by VACE's 'expand_ratio'"):
        one(src, dict(task='outpaint', outpaint_ratio=0.5))
    # a mask video from the manifest wins; missing pixels are grey
    given = one(src, dict(task='outpaint', mask='mask.mp4'))
    m = torch.from_numpy(src['mask']).float()[None]
    assert torch.equal(given['masks'], m)
    np.testing.assert_allclose(given['frames'], unit(src['gt']) * (1 - m), atol=1e-6)


@pytest.mark.parametrize('mode, kept', [
    ('firstclip', list(range(0, 5))), ('lastclip', list(range(12, 17))),
    ('firstlastclip', list(range(0, 5)) + list(range(12, 17))),
    ('firstframe', [0]), ('lastframe', [16]), ('firstlastframe', [0, 16])])
def test_extension_modes(src, mode, kept):
    vcu = one(src, dict(task='extension', options=dict(extension_mode=mode)))
    gt = unit(src['gt'])
    for t in range(T):
        if t in kept:  # given frame: the real frame, mask 0
            assert bool((vcu['masks'][:, t] == 0).all())
            np.testing.assert_allclose(vcu['frames'][:, t], gt[:, t], atol=1e-6)
        else:          # generated frame: grey, mask 1
            assert bool((vcu['masks'][:, t] == 1).all()) and bool((vcu['frames'][:, t] == 0).all())
    alias = one(src, dict(task=mode))
    assert torch.equal(alias['masks'], vcu['masks'])


def test_extension_random_clip_is_contiguous_and_deterministic(src):
    rows = [dict(task='randomclip', options=dict(clip_frames=4)) for _ in range(6)]
    ds = dataset(src, rows, seed=3)
    starts = set()
    for i in range(len(rows)):
        first = ds.get_vcu(i)
        kept = np.flatnonzero((first['masks'][0, :, 0, 0] == 0).numpy())
        assert len(kept) == 4 and (np.diff(kept) == 1).all()
        assert torch.equal(ds.get_vcu(i)['masks'], first['masks'])  # same clip every epoch
        starts.add(int(kept[0]))
    assert len(starts) > 1  # different samples, different positions
    fixed = one(src, dict(task='extension', options=dict(extension_mode='randomclip', clip_start=7)))
    assert (fixed['masks'][0, :, 0, 0] == 0).nonzero().flatten().tolist() == [7, 8, 9, 10, 11]


def test_inpaint_by_box_and_by_mask(src):
    vcu = one(src, dict(task='inpaint', box=[8, 4, 40, 20]))
    expected = torch.zeros(1, T, H, W)
    expected[:, :, 4:20, 8:40] = 1
    assert torch.equal(vcu['masks'], expected)
    np.testing.assert_allclose(vcu['frames'], unit(src['gt']) * (1 - expected), atol=1e-6)
    vcu = one(src, dict(task='inpaint', mask='mask.mp4'))
    assert torch.equal(vcu['masks'], torch.from_numpy(src['mask']).float()[None])


@pytest.mark.parametrize('control', ['depth', 'grey'])
def test_firstframe_composites(src, control):
    row = dict(task=f'firstframe_{control}')
    if control == 'depth':
        row['condition'] = 'depth.mp4'
    vcu = one(src, row)
    gt = unit(src['gt'])
    ctrl = unit(src['depth']) if control == 'depth' else luma(src['gt'])
    np.testing.assert_allclose(vcu['frames'][:, 0], gt[:, 0], atol=1e-6)
    np.testing.assert_allclose(vcu['frames'][:, 1:], ctrl[:, 1:], atol=1 / 127.5 + 1e-6)
    assert bool((vcu['masks'][:, 0] == 0).all()) and bool((vcu['masks'][:, 1:] == 1).all())
    assert vcu['ref_images'] is None


@pytest.mark.parametrize('control', ['pose', 'scribble', 'flow'])
def test_reference_composites(src, control):
    row = dict(task=f'{control}_reference', ref_images=['ref.png'])
    if control == 'pose':
        row['condition'] = 'depth.mp4'
    vcu = one(src, row)
    alone = one(src, dict(row, task=control, ref_images=None))
    assert vcu['num_ref'] == 1 and vcu['ref_images'].shape == (3, 1, H, W)
    assert torch.equal(vcu['frames'], alone['frames']) and bool((vcu['masks'] == 1).all())
    ref_only = one(src, dict(task='reference', ref_images=['ref.png']))
    assert torch.equal(vcu['ref_images'], ref_only['ref_images'])


def test_resized_clip_keeps_frames_and_conditions_aligned(src):
    # 48×64 → 32×48 cover: scale 0.75 → 36×48, rows 2..34
    vcu = one(src, dict(task='firstframe_grey'), height=32, width=48)
    small = np.stack([cv2.resize(f, (48, 36), interpolation=cv2.INTER_AREA)[2:34] for f in src['gt']])
    np.testing.assert_allclose(vcu['video'], unit(small), atol=1e-6)
    np.testing.assert_allclose(vcu['frames'][:, 1:], luma(small)[:, 1:], atol=1 / 127.5 + 1e-6)
    inp = one(src, dict(task='inpaint', box=[8, 4, 40, 20]), height=32, width=48)
    # box through the geometry: x·0.75, y·0.75 − 2 → [6, 1, 30, 13]
    expected = torch.zeros(1, T, 32, 48)
    expected[:, :, 1:13, 6:30] = 1
    assert torch.equal(inp['masks'], expected)


def test_frame_range_and_stride(src):
    vcu = one(src, dict(task='grey', frame_start=2), frame_stride=1, num_frames=17)
    full = read_video(str(src['dir'] / 'gt.mp4'))
    np.testing.assert_allclose(vcu['video'], unit(full[2:19]), atol=1e-6)
    vcu = one(src, dict(task='t2v'), frame_stride=2, num_frames=9)
    np.testing.assert_allclose(vcu['video'], unit(full[0:17:2]), atol=1e-6)
    with pytest.raises(VCUInputError, match='too few frames') as err:
        one(src, dict(task='t2v'), frame_stride=2, num_frames=13)
    assert 'gt.mp4' in str(err.value) and 's0' in str(err.value)


def test_missing_condition_and_ignored_mask(src, caplog):
    source = SourceSample('x1', src['gt'])
    for task in ('depth', 'firstframe_pose', 'reference_depth'):
        with pytest.raises(VCUInputError, match='made offline') as err:
            build_vcu(task, SourceSample('x1', src['gt'], ref_images=[src['ref']]))
        assert "'condition'" in str(err.value) and 'x1' in str(err.value) and task in str(err.value)
    with pytest.raises(VCUInputError, match='needs reference images') as err:
        build_vcu('reference_grey', source)
    assert "'ref_images'" in str(err.value)
    with pytest.raises(VCUInputError, match='unknown task'):
        build_vcu('levitate', source)
    with caplog.at_level(logging.WARNING):
        vcu = one(src, dict(task='grey', mask='mask.mp4'))
    assert bool((vcu['masks'] == 1).all())
    assert any("does not use field 'mask'" in r.message for r in caplog.records)
