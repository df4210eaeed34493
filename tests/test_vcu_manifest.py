"""vdot_ext.patches.manifest: CSV/JSONL parsing, the public VDOT CSV layout,
path resolution, task aliases and validation errors."""
import csv
import json
import os

import pytest

from vdot_ext.patches.manifest import detect_layout, parse_manifest
from vdot_ext.patches.tasks import COMPOSITE_TASKS, SINGLE_TASKS, TASKS, UVCBENCH_TASKS, resolve_task
from vdot_ext.patches.video_reader import VCUInputError


@pytest.fixture
def files(tmp_path):
    """Placeholder media files in data/ (parsing checks existence, not content)."""
    data = tmp_path / 'data'
    data.mkdir()
    for name in ('gt.mp4', 'depth.mp4', 'mask.mp4', 'r1.png', 'r2.png', 'src.mp4'):
        (data / name).write_bytes(b'x')
    return tmp_path


def write_csv(path, rows, columns):
    with open(path, 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return str(path)


def write_jsonl(path, rows):
    with open(path, 'w') as handle:
        for row in rows:
            handle.write(json.dumps(row) + '\n')
    return str(path)


def test_registry_covers_uvcbench():
    assert len(SINGLE_TASKS) == 8 and len(COMPOSITE_TASKS) == 10 and len(UVCBENCH_TASKS) == 18
    assert set(UVCBENCH_TASKS) | {'t2v', 'inpaint'} == set(TASKS)
    assert resolve_task('Depth-FirstFrame') == ('firstframe_depth', {})
    assert resolve_task('ref+gray') == ('reference_grey', {})
    assert resolve_task('pose_reference') == ('reference_pose', {})
    assert resolve_task('outpainting') == ('outpaint', {})
    assert resolve_task('optical_flow') == ('flow', {})
    assert resolve_task('lastclip') == ('extension', {'extension_mode': 'lastclip'})
    assert resolve_task('firstframe') == ('extension', {'extension_mode': 'firstframe'})
    assert resolve_task('image_reference') == ('reference', {})
    with pytest.raises(KeyError, match='unknown task'):
        resolve_task('teleport')


def test_csv_layout_paths_options_and_lists(files):
    rows = [
        dict(id='a', task='depth', prompt='a cat', video='data/gt.mp4', condition='data/depth.mp4',
             frame_start='4', frame_end='40'),
        dict(id='b', task='reference_grey', prompt='a dog', video='data/gt.mp4',
             ref_images='data/r1.png;data/r2.png', options='{"ref_fill": 0.0}'),
        dict(id='c', task='outpainting', prompt='sea', video=str(files / 'data' / 'gt.mp4'),
             outpaint_ratio='0.5', outpaint_directions='left,up'),
        dict(id='d', task='inpaint', prompt='road', video='data/gt.mp4', box='[1, 2, 30, 20]'),
        dict(id='e', task='firstlastframe', prompt='x', video='data/gt.mp4', ref_box='0,0,8,8'),
    ]
    columns = ['id', 'task', 'prompt', 'video', 'condition', 'mask', 'ref_images', 'frame_start',
               'frame_end', 'box', 'ref_box', 'options', 'outpaint_ratio', 'outpaint_directions']
    path = write_csv(files / 'm.csv', rows, columns)
    parsed, errors = parse_manifest(path)
    assert errors == [] and [r.sample_id for r in parsed] == list('abcde')
    a, b, c, d, e = parsed
    data = os.path.join(str(files), 'data')
    assert a.video == os.path.join(data, 'gt.mp4') and a.condition == os.path.join(data, 'depth.mp4')
    assert (a.frame_start, a.frame_end, a.task, a.num_ref) == (4, 40, 'depth', 0)
    assert b.ref_images == [os.path.join(data, 'r1.png'), os.path.join(data, 'r2.png')]
    assert b.task == 'reference_grey' and b.num_ref == 2 and b.options == {'ref_fill': 0.0}
    assert c.task == 'outpaint' and c.options == {'outpaint_ratio': 0.5,
                                                  'outpaint_directions': ['left', 'up']}
    assert d.box == (1.0, 2.0, 30.0, 20.0) and d.mask is None
    assert e.task == 'extension' and e.options == {'extension_mode': 'firstlastframe'}
    assert e.ref_box == (0.0, 0.0, 8.0, 8.0) and e.num_ref == 0  # extension uses no references
    assert detect_layout(columns) == 'vdot_ext'


def test_jsonl_layout(files):
    rows = [dict(task='reference', prompt='p', video='data/gt.mp4', ref_images=['data/r1.png']),
            dict(task='extension', prompt='q', video='data/gt.mp4',
                 options=dict(extension_mode='randomclip', clip_frames=3), negative_prompt='blur'),
            dict(task='t2v', prompt='r', video='data/gt.mp4', ref_box=[0, 0, 4, 4], ref_frame=2)]
    path = write_jsonl(files / 'm.jsonl', rows)
    parsed, _ = parse_manifest(path)
    assert [r.sample_id for r in parsed] == ['line1', 'line2', 'line3']
    assert parsed[0].num_ref == 1 and parsed[0].ref_images[0].endswith('data/r1.png')
    assert parsed[1].options == dict(extension_mode='randomclip', clip_frames=3)
    assert parsed[1].negative_prompt == 'blur'
    assert parsed[2].ref_frame == 2 and parsed[2].num_ref == 0


def test_public_vdot_csv_layout(files):
    columns = ['task_name', 'src_video_path', 'mask_video_path', 'ref_image_path', 'internvl_short',
               'video_path', 'unrelated']
    rows = [dict(task_name='depth', src_video_path='data/depth.mp4', video_path='data/gt.mp4',
                 internvl_short='a man walking', unrelated='zzz'),
            dict(task_name='outpainting', src_video_path='data/src.mp4',
                 mask_video_path='data/mask.mp4', video_path='data/gt.mp4', internvl_short='sea'),
            dict(task_name='depth_reference', src_video_path='data/depth.mp4',
                 ref_image_path='data/r1.png', video_path='data/gt.mp4', internvl_short='dog')]
    path = write_csv(files / 'vdot.csv', rows, columns)
    assert detect_layout(columns) == 'vdot'
    parsed, _ = parse_manifest(path)
    depth, outpaint, ref_depth = parsed
    assert depth.task == 'depth' and depth.prompt == 'a man walking'
    assert depth.condition.endswith('data/depth.mp4') and depth.video.endswith('data/gt.mp4')
    assert outpaint.mask.endswith('data/mask.mp4') and outpaint.condition.endswith('data/src.mp4')
    assert ref_depth.task == 'reference_depth' and ref_depth.num_ref == 1
    # without a ground-truth column the src video is the source for derived conditions ...
    columns = ['task_name', 'src_video_path', 'mask_video_path', 'ref_image_path', 'internvl_short']
    path = write_csv(files / 'vdot_nogt.csv',
                     [dict(task_name='gray', src_video_path='data/src.mp4', internvl_short='x')], columns)
    (row,), _ = parse_manifest(path)
    assert row.task == 'grey' and row.video.endswith('data/src.mp4') and row.condition is None
    # ... and depth/pose cannot work: the error names the missing column
    path = write_csv(files / 'vdot_nogt_depth.csv',
                     [dict(task_name='depth', src_video_path='data/depth.mp4', internvl_short='x')],
                     columns)
    with pytest.raises(VCUInputError, match='ground-truth video') as err:
        parse_manifest(path)
    assert 'vdot_nogt_depth.csv' in str(err.value) and "'video'" in str(err.value)


@pytest.mark.parametrize('row, field, match', [
    (dict(task='teleport', prompt='p', video='data/gt.mp4'), 'task', 'unknown task'),
    (dict(task='depth', prompt='  ', video='data/gt.mp4', condition='data/depth.mp4'), 'prompt',
     'empty prompt'),
    (dict(task='grey', prompt='p', video='data/missing.mp4'), 'video', 'no such file'),
    (dict(task='depth', prompt='p', video='data/gt.mp4'), 'condition', 'needs a depth video'),
    (dict(task='reference_pose', prompt='p', video='data/gt.mp4', condition='data/depth.mp4'),
     'ref_images', 'needs reference images'),
    (dict(task='reference', prompt='p', video='data/gt.mp4', ref_images=['data/gone.png']),
     'ref_images', 'no such file'),
    (dict(task='inpaint', prompt='p', video='data/gt.mp4'), 'mask', 'needs a mask'),
    (dict(task='grey', prompt='p', video='data/gt.mp4', options={'zoom': 2}), 'options',
     'unknown task options'),
    (dict(task='grey', prompt='p', video='data/gt.mp4', frame_start=10, frame_end=5),
     'frame_start/frame_end', 'frame range'),
    (dict(task='grey', prompt='p', video='data/gt.mp4', box=[5, 5, 1, 1]), 'box', 'x1 > x0'),
    (dict(task='grey', prompt='p'), 'video', 'no ground-truth video'),
])
def test_bad_rows_name_line_field_and_file(files, row, field, match):
    path = write_jsonl(files / 'bad.jsonl', [dict(task='grey', prompt='ok', video='data/gt.mp4'), row])
    with pytest.raises(VCUInputError, match=match) as err:
        parse_manifest(path)
    msg = str(err.value)
    assert f"'{field}'" in msg and 'line 2' in msg, msg
    # opt-in: bad rows are dropped, returned and counted
    parsed, errors = parse_manifest(path, skip_bad=True)
    assert len(parsed) == 1 and len(errors) == 1 and errors[0].field == field


def test_manifest_file_errors(files):
    with pytest.raises(VCUInputError, match='no such manifest'):
        parse_manifest(str(files / 'nothing.csv'))
    (files / 'm.txt').write_text('x')
    with pytest.raises(VCUInputError, match='unknown manifest type'):
        parse_manifest(str(files / 'm.txt'))
    (files / 'broken.jsonl').write_text('{"task": "grey", "prompt": "p", "video": "data/gt.mp4"}\n{oops\n')
    with pytest.raises(VCUInputError, match='line 2 is not valid JSON'):
        parse_manifest(str(files / 'broken.jsonl'))
    (files / 'empty.csv').write_text('task,prompt,video\n')
    with pytest.raises(VCUInputError, match='no rows'):
        parse_manifest(str(files / 'empty.csv'))
    path = write_jsonl(files / 'dup.jsonl', [dict(id='x', task='grey', prompt='p', video='data/gt.mp4'),
                                             dict(id='x', task='grey', prompt='q', video='data/gt.mp4')])
    with pytest.raises(VCUInputError, match='duplicate sample id'):
        parse_manifest(path)
    path = write_csv(files / 'both.csv', [dict(prompt='p', caption='q', task='grey', video='data/gt.mp4')],
                     ['prompt', 'caption', 'task', 'video'])
    with pytest.raises(VCUInputError, match="both give 'prompt'"):
        parse_manifest(path)
