"""vdot_ext.patches.video_reader on real mp4/png files: frame indices (decord),
stride/fps sampling, resize/crop geometry, mask alignment, bad files."""
import logging
import os

import cv2
import numpy as np
import pytest

from vdot_ext.data.video_io import read_video, write_mp4, write_png
from vdot_ext.patches.video_reader import (
    VCUInputError,
    frame_geometry,
    open_video,
    read_image,
    read_mask,
    read_video_frames,
    sample_frame_indices,
)


def coded_video(num_frames, height=48, width=64):
    """Frame t is a flat grey of value 8 + 12 t: the decoded mean tells the index."""
    v = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        v[t] = 8 + 12 * t
    return v


def textured_video(num_frames, height, width, seed=0):
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 255, (height // 4, width // 4, 3), np.uint8), (width, height),
                      interpolation=cv2.INTER_CUBIC)
    return np.stack([np.roll(base, t, axis=1) for t in range(num_frames)])


def decoded_index(frame):
    return int(round((frame.astype(float).mean() - 8) / 12))


def test_sample_frame_indices_stride_fps_range(caplog):
    assert sample_frame_indices(100, 5, stride=3, start=2) == [2, 5, 8, 11, 14]
    # fps: native 30 → 12 fps, step 2.5, idx = start + floor(i·2.5 + 0.5)
    assert sample_frame_indices(100, 5, fps=12, native_fps=30) == [0, 3, 5, 8, 10]
    assert sample_frame_indices(100, 9, start=10, end=20) == list(range(10, 19))
    with pytest.raises(VCUInputError, match='too few frames'):
        sample_frame_indices(100, 13, start=10, end=20, where='clip.mp4', sample='s1')
    with pytest.raises(VCUInputError, match='too few frames.*'):
        sample_frame_indices(16, 17)
    with caplog.at_level(logging.WARNING):
        idx = sample_frame_indices(7, 9, on_short='pad', where='short.mp4', sample='s2')
    assert idx == [0, 1, 2, 3, 4, 5, 6, 6, 6]
    assert any('repeating frame 6' in r.message and 'short.mp4' in r.message for r in caplog.records)
    with pytest.raises(ValueError, match='4k\\+1'):
        sample_frame_indices(100, 8)
    with pytest.raises(VCUInputError, match='frame range'):
        sample_frame_indices(10, 5, start=12)


def test_decord_reads_the_requested_frames(tmp_path):
    path = write_mp4(str(tmp_path / 'coded.mp4'), coded_video(20), fps=8)
    reader, info = open_video(path)
    assert (info.num_frames, info.height, info.width) == (20, 48, 64)
    assert info.fps == pytest.approx(8.0)
    idx = sample_frame_indices(info.num_frames, 9, stride=2, start=1)
    frames, geometry = read_video_frames(path, idx, 48, 64, reader=reader)
    assert frames.shape == (9, 48, 64, 3) and frames.dtype == np.uint8
    assert [decoded_index(f) for f in frames] == idx == list(range(1, 18, 2))
    # fps sampling: 8 fps → 4 fps is every second frame
    idx = sample_frame_indices(info.num_frames, 5, fps=4, native_fps=info.fps)
    frames, _ = read_video_frames(path, idx, 48, 64)
    assert [decoded_index(f) for f in frames] == [0, 2, 4, 6, 8]
    # out-of-order and repeated indices are honoured
    frames, _ = read_video_frames(path, [5, 5, 0, 19, 3], 48, 64)
    assert [decoded_index(f) for f in frames] == [5, 5, 0, 19, 3]
    with pytest.raises(VCUInputError, match='too few frames'):
        read_video_frames(path, [0, 25], 48, 64, field='video', sample='s')


def test_resize_cover_crop_stretch_and_box_mapping(tmp_path):
    src = textured_video(5, 48, 96)
    path = write_mp4(str(tmp_path / 'wide.mp4'), src)
    decoded = read_video(path)  # independent decode of the same file
    frames, geometry = read_video_frames(path, range(5), 32, 32, 'cover')
    # cover: s = max(32/48, 32/96) → 32 × 64, centre crop columns 16..48
    assert (geometry.resized_height, geometry.resized_width, geometry.top, geometry.left) == (32, 64, 0, 16)
    expected = np.stack([cv2.resize(f, (64, 32), interpolation=cv2.INTER_AREA)[:, 16:48] for f in decoded])
    np.testing.assert_array_equal(frames, expected)
    # source x = 48 → 48 · 64/96 − 16 = 16 in the crop; y scales by 32/48
    assert geometry.map_box([48, 0, 96, 48]) == (16, 0, 32, 32)
    assert geometry.map_box([0, 0, 10, 10]) == (0, 0, 0, 7)  # left of the crop: empty in x
    linear, _ = read_video_frames(path, range(5), 32, 32, 'cover', shrink='linear')
    np.testing.assert_array_equal(linear, np.stack(
        [cv2.resize(f, (64, 32), interpolation=cv2.INTER_LINEAR)[:, 16:48] for f in decoded]))
    with pytest.raises(ValueError, match='shrink interpolation'):
        read_video_frames(path, range(5), 32, 32, 'cover', shrink='cubic')
    stretched, g2 = read_video_frames(path, range(5), 32, 32, 'stretch')
    expected = np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in decoded])
    np.testing.assert_array_equal(stretched, expected)
    # enlarging uses bilinear
    big, g3 = read_video_frames(path, [0], 96, 96, 'cover')
    assert (g3.resized_height, g3.resized_width, g3.left) == (96, 192, 48)
    np.testing.assert_array_equal(big[0], cv2.resize(decoded[0], (192, 96),
                                                     interpolation=cv2.INTER_LINEAR)[:, 48:144])
    g = frame_geometry(480, 854, 480, 832)
    assert (g.resized_height, g.resized_width, g.left) == (480, 854, 11)


def test_mask_alignment_and_mismatch_errors(tmp_path):
    video = write_mp4(str(tmp_path / 'v.mp4'), textured_video(9, 48, 64))
    _, info = open_video(video)
    m = np.zeros((9, 48, 64, 3), np.uint8)
    m[:, 8:24, 16:40] = 255
    mask_video = write_mp4(str(tmp_path / 'mask.mp4'), m)
    mask = read_mask(mask_video, range(9), 48, 64, expect=info)
    assert mask.dtype == bool and mask.shape == (9, 48, 64)
    np.testing.assert_array_equal(mask, m[..., 0] > 127)
    mask_png = write_png(str(tmp_path / 'mask.png'), m[0])
    still = read_mask(mask_png, [0, 2, 4], 24, 32, expect=info)  # resized with the video geometry
    assert still.shape == (3, 24, 32)
    assert still[:, 4:12, 8:20].all() and not still[:, :4].any() and not still[:, :, :8].any()
    # size mismatch
    small = write_mp4(str(tmp_path / 'small.mp4'), m[:, :24, :32])
    with pytest.raises(VCUInputError, match='size mismatch') as err:
        read_mask(small, range(9), 48, 64, sample='s1', expect=info)
    assert 'small.mp4' in str(err.value) and "'mask'" in str(err.value) and 's1' in str(err.value)
    small_png = write_png(str(tmp_path / 'small.png'), m[0, :24, :32])
    with pytest.raises(VCUInputError, match='size mismatch'):
        read_mask(small_png, range(9), 48, 64, expect=info)
    # length mismatch (condition video with other frame count)
    short = write_mp4(str(tmp_path / 'short.mp4'), textured_video(5, 48, 64))
    with pytest.raises(VCUInputError, match='length mismatch') as err:
        read_video_frames(short, range(5), 48, 64, field='condition', expect=info)
    assert 'short.mp4' in str(err.value) and "'condition'" in str(err.value)


def test_corrupt_missing_and_unreadable_files(tmp_path):
    good = write_mp4(str(tmp_path / 'good.mp4'), textured_video(9, 48, 64))
    data = open(good, 'rb').read()
    truncated = tmp_path / 'truncated.mp4'
    truncated.write_bytes(data[:len(data) // 2])
    garbage = tmp_path / 'garbage.mp4'
    garbage.write_bytes(os.urandom(4096))
    for path in (truncated, garbage):
        with pytest.raises(VCUInputError, match='corrupt') as err:
            open_video(str(path), 'condition', 'sample7')
        msg = str(err.value)
        assert str(path) in msg and "'condition'" in msg and 'sample7' in msg
    with pytest.raises(VCUInputError, match='no such file'):
        open_video(str(tmp_path / 'nope.mp4'))
    bad_png = tmp_path / 'bad.png'
    bad_png.write_bytes(b'not a png at all')
    with pytest.raises(VCUInputError, match='cannot read as an image') as err:
        read_image(str(bad_png), 'ref_images', 's')
    assert 'bad.png' in str(err.value)
    with pytest.raises(VCUInputError, match='no such file'):
        read_image(str(tmp_path / 'missing.png'))


def test_read_image_converts_to_rgb(tmp_path):
    from PIL import Image
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    Image.fromarray(np.full((10, 12), 77, np.uint8), 'L').save(tmp_path / 'g.png')
    a = read_image(str(tmp_path / 'a.png'))
    g = read_image(str(tmp_path / 'g.png'))
    assert a.shape == g.shape == (10, 12, 3) and a.flags.writeable
    assert (a[..., 0] == 200).all() and (g == 77).all()


def test_video_io_writes_atomically_and_read_errors_name_the_file(tmp_path, monkeypatch):
    from vdot_ext.data.video_io import read_png
    write_mp4(str(tmp_path / 'old.mp4'), coded_video(5))
    write_png(str(tmp_path / 'old.png'), np.zeros((8, 8, 3), np.uint8))
    before = {p: (tmp_path / p).read_bytes() for p in ('old.mp4', 'old.png')}

    def crash(*args):  # killed between writing and renaming
        raise OSError('simulated crash before the rename')
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(OSError, match='simulated crash'):
        write_mp4(str(tmp_path / 'old.mp4'), coded_video(9))
    with pytest.raises(OSError, match='simulated crash'):
        write_png(str(tmp_path / 'old.png'), np.full((8, 8, 3), 255, np.uint8))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['old.mp4', 'old.png']  # no torn file, no temporary
    assert all((tmp_path / p).read_bytes() == data for p, data in before.items())
    (tmp_path / 'bad.mp4').write_bytes(os.urandom(2000))
    (tmp_path / 'bad.png').write_bytes(os.urandom(200))
    for read, name in ((read_video, 'bad.mp4'), (read_png, 'bad.png')):
        with pytest.raises(ValueError, match='cannot decode') as err:
            read(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value)
