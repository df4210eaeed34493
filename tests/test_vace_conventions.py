"""Each VCU condition against the values VACE's own preprocessing code gives.

The ``vace_*`` helpers below restate, on plain arrays, the formulas of VACE's
annotators (ali-vilab/VACE, ``vace/annotators/``): ``gray.py`` (BGR2GRAY on RGB
frames), ``outpainting.py`` (``expand_ratio`` per side; the expanding and the
in-place annotator), ``frameref.py`` (which frames are given, mask 0, and which
are grey, mask 1), and the task names of ``vace/configs/``. Our builders
(:mod:`vdot_ext.patches.tasks`) must give the same pixels on a fixed synthetic
clip.
"""
import math

import cv2
import numpy as np
import pytest
import torch

from vdot_ext.patches import conditions as C
from vdot_ext.patches.tasks import SourceSample, build_vcu, merge_options, resolve_task
from vdot_ext.patches.video_reader import VCUInputError

T, H, W = 9, 48, 64


def clip(background=(128, 128, 128)):
    """A bright square sliding right 2 px/frame over a flat background, plus
    pure red/green/blue patches: edges for scribble, primaries for grey."""
    frames = np.empty((T, H, W, 3), np.uint8)
    frames[:] = background
    for t in range(T):
        frames[t, 12:36, 16 + 2 * t:40 + 2 * t] = 235
    frames[:, 40:46, 2:8] = (255, 0, 0)
    frames[:, 40:46, 10:16] = (0, 255, 0)
    frames[:, 40:46, 18:24] = (0, 0, 255)
    return frames


def vcu(task, frames=None, sample_id='s0', **options):
    refs = [np.full((20, 30, 3), 200, np.uint8)]
    return build_vcu(task, SourceSample(sample_id, clip() if frames is None else frames, ref_images=refs),
                     options)


# ------------------------------------------------------------------- grey
def vace_gray(frames):
    """vace/annotators/gray.py GrayAnnotator.forward on RGB frames (utils.read_video_frames)."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)[..., None].repeat(3, axis=2) for f in frames])


def test_grey_of_primaries_is_vaces():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [228, 28, 28], [255, 255, 255], [0, 0, 0]]],
                  np.uint8)[None].repeat(5, 0)  # [5, 1, 6, 3]: one row of colours per frame
    grey = vcu('grey', px).frames[0, 0, :, 0].tolist()
    # Y = 0.114 R + 0.587 G + 0.299 B (VACE), not BT.601's 0.299 R + 0.587 G + 0.114 B
    assert grey == [29, 150, 76, 51, 255, 0]  # BT.601 would give 76, 150, 29, 88
    np.testing.assert_array_equal(vcu('grey', px).frames, vace_gray(px))


@pytest.mark.parametrize('task', ['grey', 'gray', 'firstframe_grey', 'reference_grey', 'v2v_gray'])
def test_grey_tasks_equal_vace_gray_annotator(task):
    frames = clip()
    out = vcu(task)
    first = 1 if task.startswith('firstframe') else 0  # the composite keeps frame 0 as is
    np.testing.assert_array_equal(out.frames[first:], vace_gray(frames)[first:])
    y = (frames.astype(np.float64) * C.VACE_GREY_WEIGHTS).sum(-1)
    assert np.abs(out.frames[first:, ..., 0] - y[first:]).max() <= 1  # the formula, fixed point


# --------------------------------------------------------------- scribble
@pytest.mark.parametrize('task', ['scribble', 'firstframe_scribble', 'reference_scribble', 'canny',
                                  'lineart', 'edge'])
def test_scribble_is_dark_lines_on_light_paper(task):
    out = vcu(task, clip(background=(40, 90, 160)))
    frames = out.frames[1:]  # (frame 0 of firstframe_scribble is the video frame)
    assert frames.mean() > 200  # white paper, as VACE's scribble annotator draws
    for t in range(1, T):
        left = 16 + 2 * t  # the square's left outline is a line in every frame
        assert out.frames[t, 14:34, left - 1:left + 1].min() < 60
        assert out.frames[t, 2:10, 2:60].min() > 200  # flat background: no line
    if task in ('canny', 'lineart', 'edge'):
        np.testing.assert_array_equal(out.frames, vcu('scribble', clip(background=(40, 90, 160))).frames)


# VACE's ContourInference (scribble.py): nn.Sequential indices of its convolutions
VACE_SCRIBBLE_KEYS = (['model0.1.weight', 'model0.1.bias', 'model1.0.weight', 'model1.0.bias',
                       'model1.3.weight', 'model1.3.bias']
                      + [f'model2.{b}.conv_block.{i}.{p}' for b in range(3) for i in (1, 5)
                         for p in ('weight', 'bias')]
                      + ['model3.0.weight', 'model3.0.bias', 'model3.3.weight', 'model3.3.bias',
                         'model4.1.weight', 'model4.1.bias'])


def test_scribble_network_loads_vaces_layout_and_converts_like_vace(tmp_path):
    net = C.ScribbleNet(width=4, num_blocks=3)
    assert sorted(net.state_dict()) == sorted(VACE_SCRIBBLE_KEYS)
    assert C.ScribbleNet().state_dict()['model0.1.weight'].shape == (64, 3, 7, 7)  # VACE's width
    with torch.no_grad():
        net.model4[1].bias.fill_(4.0)  # mostly white paper
    path = str(tmp_path / 'netG_A_latest.pth')
    torch.save(net.state_dict(), path)
    frames = clip()
    out = vcu('scribble', frames, scribble_model=path).frames
    # VACE: (model(img.float() / 255) · 255).clip(0, 255).astype(uint8), repeated to 3 channels
    with torch.no_grad():
        y = net(torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255))[:, 0]
    expected = (y * 255.0).clamp(0, 255).numpy().astype(np.uint8)
    np.testing.assert_array_equal(out, expected[..., None].repeat(3, -1))
    assert out.mean() > 200
    bad = dict(net.state_dict())
    bad['model4.1.weight'] = bad['model4.1.weight'] * float('nan')
    torch.save(bad, str(tmp_path / 'nan.pth'))
    with pytest.raises(VCUInputError, match='NaN') as err:
        vcu('scribble', frames, scribble_model=str(tmp_path / 'nan.pth'))
    assert 'nan.pth' in str(err.value)
    torch.save({'conv.weight': torch.zeros(1)}, str(tmp_path / 'other.pth'))
    with pytest.raises(VCUInputError, match='not a VACE scribble network'):
        vcu('scribble', frames, scribble_model=str(tmp_path / 'other.pth'))


# -------------------------------------------------------------- outpaint
def vace_outpainting_mask(src_h, src_w, expand_ratio, direction):
    """outpainting.py OutpaintingAnnotator.forward with the video config
    (KEEP_PADDING_RATIO 1): the canvas and its mask (True = 255 = generate)."""
    left = int(expand_ratio * src_w) if 'left' in direction else 0
    right = int(expand_ratio * src_w) if 'right' in direction else 0
    up = int(expand_ratio * src_h) if 'up' in direction else 0
    down = int(expand_ratio * src_h) if 'down' in direction else 0
    tar_w, tar_h = math.ceil(src_w + left + right), math.ceil(src_h + up + down)
    if left > 0:
        left = left * (tar_w - src_w) // (left + right)
    if right > 0:
        right = tar_w - src_w - left
    if up > 0:
        up = up * (tar_h - src_h) // (up + down)
    if down > 0:
        down = tar_h - src_h - up
    mask = np.ones((tar_h, tar_w), bool)
    mask[up:tar_h - down, left:tar_w - right] = False  # PIL rectangle (l, u, W-r-1, H-d-1) inclusive
    return mask


def vace_outpainting_inner_kept(h, w, expand_ratio, direction):
    """outpainting.py OutpaintingInnerAnnotator: the pixels pasted back (not grey)."""
    left = int(expand_ratio * w) if 'left' in direction else 0
    right = int(expand_ratio * w) if 'right' in direction else 0
    up = int(expand_ratio * h) if 'up' in direction else 0
    down = int(expand_ratio * h) if 'down' in direction else 0
    kept = np.zeros((h, w), bool)
    kept[up:h - down, left:w - right] = True
    return kept


@pytest.mark.parametrize('src, ratio, direction', [
    ((48, 32), 0.25, ['left', 'right']),         # VACE's video default: canvas 48 × 48
    ((32, 40), 0.25, ['left', 'right', 'up', 'down']),
    ((40, 32), 0.5, ['left']),
    ((20, 40), 0.3, ['up', 'right']),
])
def test_outpaint_borders_equal_vaces_expanded_canvas(src, ratio, direction):
    expected = vace_outpainting_mask(*src, ratio, direction)
    h, w = expected.shape
    frames = np.zeros((2, h, w, 3), np.uint8)
    out = build_vcu('outpainting', SourceSample('s', frames),
                    dict(expand_ratio=ratio, direction=','.join(direction)))
    np.testing.assert_array_equal(out.masks[0], expected)
    np.testing.assert_array_equal(out.missing, out.masks)  # grey where generated


def test_outpaint_default_is_vaces_video_config():
    # expand_ratio 0.25 on left and right: on 48 columns a 32-column source, 8 per side
    # (the old split ratio gave round(0.25·48/2) = 6 on all four sides)
    out = build_vcu('outpaint', SourceSample('s', np.zeros((2, 32, 48, 3), np.uint8)))
    assert out.info['outpaint_borders'] == dict(left=8, right=8, up=0, down=0)
    np.testing.assert_array_equal(out.masks[0], vace_outpainting_mask(32, 32, 0.25, ['left', 'right']))


@pytest.mark.parametrize('ratio, direction', [(0.25, ['left', 'right']), (0.1, ['up', 'down', 'left'])])
def test_outpaint_inner_equals_vaces_inner_annotator(ratio, direction):
    out = vcu('outpainting_inner', expand_ratio=ratio, direction=direction)
    np.testing.assert_array_equal(~out.masks[0], vace_outpainting_inner_kept(H, W, ratio, direction))


def test_outpaint_per_side_ratios():
    borders = C.outpaint_borders(60, 80, dict(left=0.25, up=0.2), mode='expand')
    # per axis as VACE's canvas: source 80/1.25 = 64 wide, +16 left; 60/1.2 = 50 tall, +10 up
    assert borders == dict(left=16, right=0, up=10, down=0)
    assert C.outpaint_borders(60, 80, dict(left=0.25, up=0.2), mode='inner') == dict(
        left=20, right=0, up=12, down=0)
    with pytest.raises(ValueError, match='disagrees'):
        C.outpaint_borders(60, 80, dict(left=0.25), direction=['right'])


# ------------------------------------------------------------- extension
def vace_frameref_expand_masks(mode, n, expand_num):
    """frameref.py FrameRefExpandAnnotator: given frames (mask 0) and expand_num
    grey frames (mask 255), as 1 = generate."""
    given, grey = [0] * n, [1] * expand_num
    if mode in ('firstframe', 'firstclip'):
        return given + grey
    if mode in ('lastframe', 'lastclip'):
        return grey + given
    return given + grey + given  # firstlastframe / firstlastclip


@pytest.mark.parametrize('mode, n', [('firstclip', 3), ('lastclip', 3), ('firstlastclip', 3),
                                     ('firstframe', 1), ('lastframe', 1), ('firstlastframe', 1)])
def test_extension_frames_equal_vaces_frameref(mode, n):
    expand_num = T - (2 * n if mode.startswith('firstlast') else n)
    expected = vace_frameref_expand_masks(mode, n, expand_num)
    out = vcu('extension', extension_mode=mode, clip_frames=3)
    assert out.masks.astype(int).tolist() == expected
    assert out.info['kept_frames'] == [t for t in range(T) if not expected[t]]
    frames = out.frames_tensor()
    gt = C.to_unit_float(clip())
    for t in range(T):  # given frames are the video, generated ones grey 127.5 (ref_color)
        assert torch.equal(frames[:, t], torch.zeros_like(frames[:, t]) if expected[t] else gt[:, t])


def test_extension_random_modes():
    for sid in range(6):
        frames = vcu('randomframes', sample_id=f's{sid}', random_frames=3).info['kept_frames']
        assert len(frames) == 3 and len(set(frames)) == 3  # distinct scattered frames (VACE random)
        assert frames == vcu('randomframes', sample_id=f's{sid}', random_frames=3).info['kept_frames']
    scattered = [vcu('randomframes', sample_id=f'x{i}', random_frames=3).info['kept_frames']
                 for i in range(12)]
    assert any(np.diff(k).max() > 1 for k in scattered)
    clips = [vcu('randomclip', sample_id=f'x{i}', clip_frames=3).info['kept_frames'] for i in range(12)]
    assert all(np.diff(k).tolist() == [1, 1] for k in clips)  # ours: one contiguous clip
    assert len({k[0] for k in clips}) > 1


def test_extension_mode_distribution_is_seeded_per_sample():
    opts = dict(extension_mode={'firstclip': 3, 'lastframe': 1})
    modes = [vcu('extension', sample_id=f'id{i}', **opts).info['extension_mode'] for i in range(200)]
    assert modes == [vcu('extension', sample_id=f'id{i}', **opts).info['extension_mode']
                     for i in range(200)]  # deterministic per sample
    assert 0.65 < modes.count('firstclip') / 200 < 0.85
    assert merge_options(dict(extension_mode=['lastclip', 'firstframe']))['extension_mode'] == {
        'lastclip': 0.5, 'firstframe': 0.5}
    with pytest.raises(VCUInputError, match='extension_mode'):
        vcu('extension', extension_mode={'sideways': 1})
    # a manifest row's option wins over the dataset's distribution
    row = build_vcu('extension', SourceSample('r', clip()), merge_options(opts, dict(extension_mode='lastclip')))
    assert row.info['extension_mode'] == 'lastclip'


# ---------------------------------------------------------------- names
def test_vace_task_names():
    assert resolve_task('frameref') == ('extension', {'extension_mode': 'firstframe'})
    assert vcu('frameref').info['kept_frames'] == [0]  # VACE's frameref default: first frame
    assert resolve_task('outpainting') == ('outpaint', {})
    assert resolve_task('outpainting_inner') == ('outpaint', {'outpaint_mode': 'inner'})
    assert resolve_task('firstlastclip') == ('extension', {'extension_mode': 'firstlastclip'})
    ext = resolve_task('framerefext')
    assert ext[0] == 'extension' and set(ext[1]['extension_mode']) == {
        'firstframe', 'lastframe', 'firstlastframe', 'randomframes'}
    for name, canon in (('gray', 'grey'), ('depthv2', 'depth'), ('pose_body', 'pose'), ('canny', 'scribble'),
                        ('lineart', 'scribble'), ('edge', 'scribble'), ('r2v', 'reference'),
                        ('v2v_gray', 'grey'), ('mv2v_outpaint', 'outpaint'), ('image_reference', 'reference')):
        assert resolve_task(name) == (canon, {}), name
    with pytest.raises(KeyError, match="'firstclip', 'lastclip' or 'firstlastclip'"):
        resolve_task('clipref')
    for name in ('image_depth', 'image_gray', 'image_pose', 'image_scribble'):
        with pytest.raises(KeyError, match='single image'):
            resolve_task(name)
    with pytest.raises(VCUInputError, match='single image'):
        vcu('image_gray')


@pytest.mark.parametrize('options, key', [
    (dict(direction='north'), 'direction'), (dict(expand_ratio='wide'), 'expand_ratio'),
    (dict(expand_ratio=-0.1), 'expand_ratio'), (dict(outpaint_mode='around'), 'outpaint_mode'),
    (dict(random_frames=0), 'random_frames'), (dict(clip_frames=2.5), 'clip_frames'),
    (dict(outpaint_directions='left'), 'outpaint_directions')])
def test_bad_option_values_name_the_option_and_sample(options, key):
    with pytest.raises(VCUInputError, match=f"options.{key}") as err:
        vcu('outpaint', sample_id='row7', **options)
    assert 'row7' in str(err.value)
