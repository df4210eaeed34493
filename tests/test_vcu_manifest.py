"""vdot_ext.patches.manifest: CSV/JSONL parsing, the public VDOT CSV layout,
path resolution, task aliases and validation errors."""
import csv
import json
import logging
import os
import re

import pytest

from vdot_ext.patches.manifest import detect_layout, parse_manifest, summarize_errors
from vdot_ext.patches.tasks import COMPOSITE_TASKS, DEFAULT_OPTIONS, SINGLE_TASKS, TASKS, UVCBENCH_TASKS, resolve_task
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
             expand_ratio='0.5', direction='left,up'),
        dict(id='d', task='inpaint', prompt='road', video='data/gt.mp4', box='[1, 2, 30, 20]'),
        dict(id='e', task='firstlastframe', prompt='x', video='data/gt.mp4', ref_box='0,0,8,8'),
    ]
    columns = ['id', 'task', 'prompt', 'video', 'condition', 'mask', 'ref_images', 'frame_start',
               'frame_end', 'box', 'ref_box', 'options', 'expand_ratio', 'direction']
    path = write_csv(files / 'm.csv', rows, columns)
    parsed, errors = parse_manifest(path)
    assert errors == [] and [r.sample_id for r in parsed] == list('abcde')
    a, b, c, d, e = parsed
    data = os.path.join(str(files), 'data')
    assert a.video == os.path.join(data, 'gt.mp4') and a.condition == os.path.join(data, 'depth.mp4')
    assert (a.frame_start, a.frame_end, a.task, a.num_ref) == (4, 40, 'depth', 0)
    assert b.ref_images == [os.path.join(data, 'r1.png'), os.path.join(data, 'r2.png')]
    assert b.task == 'reference_grey' and b.num_ref == 2 and b.options == {'ref_fill': 0.0}
    assert c.task == 'outpaint' and c.options == {'expand_ratio': 0.5, 'direction': 'left,up'}
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
    with pytest.raises(VCUInputError, match='line 2.*not valid JSON'):
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


# ---------------------------------------------------------------- bad bytes and values
GOOD = b'{"task": "grey", "prompt": "ok", "video": "data/gt.mp4"}\n'
CSV_HEAD = b'task,prompt,video,frame_end,box\ngrey,ok,data/gt.mp4,,\n'
FIRST_OPTION = next(iter(DEFAULT_OPTIONS))
FAULTS = {  # name: (file name, bytes, field, line, message)
    'non-UTF-8 (jsonl)': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": "caf\xe9", "video": "data/gt.mp4"}\n',
                          'prompt', 2, 'non-UTF-8 byte 0xe9 at character 4'),
    'non-UTF-8 (csv)': ('m.csv', CSV_HEAD + b'grey,ok,data/gt\xff.mp4,,\n', 'video', 3, 'non-UTF-8 byte 0xff'),
    'malformed JSON': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": "x" "video": "data/gt.mp4"}\n', 'prompt', 2,
                       'not valid JSON'),
    'JSON not an object': ('m.jsonl', GOOD + b'["grey", "x"]\n', 'record', 2, 'not a JSON object'),
    'CSV values past the header': ('m.csv', b'task,prompt,video\ngrey,ok,data/gt.mp4\n'
                                   b'grey,a cat, running,data/gt.mp4\n', 'record', 3, '4 values, but the header has 3'),
    'inf frame (csv)': ('m.csv', CSV_HEAD + b'grey,x,data/gt.mp4,inf,\n', 'frame_end', 3, 'finite integer'),
    'nan frame (jsonl)': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": "x", "video": "data/gt.mp4", '
                          b'"frame_start": NaN}\n', 'frame_start', 2, 'finite integer'),
    'Infinity ref_frame': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": "x", "video": "data/gt.mp4", '
                           b'"ref_frame": -Infinity}\n', 'ref_frame', 2, 'finite integer'),
    'inf box (csv)': ('m.csv', CSV_HEAD + b'grey,x,data/gt.mp4,,"0,0,inf,4"\n', 'box', 3, 'finite numbers'),
    'NaN option': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": "x", "video": "data/gt.mp4", "options": {"'
                   + FIRST_OPTION.encode() + b'": NaN}}\n', FIRST_OPTION, 2, 'finite numbers'),
    'prompt number': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": 42, "video": "data/gt.mp4"}\n', 'prompt', 2,
                      'prompt must be a string, got int 42'),
    'prompt list': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": ["a", "b"], "video": "data/gt.mp4"}\n',
                    'prompt', 2, 'prompt must be a string, got list'),
    'prompt null': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": null, "video": "data/gt.mp4"}\n', 'prompt', 2,
                    'got null'),
    'path not a string': ('m.jsonl', GOOD + b'{"task": "grey", "prompt": "x", "video": 7}\n', 'video', 2,
                          'video must be a string'),
}


@pytest.mark.parametrize('name', list(FAULTS))
def test_manifest_faults_raise_with_line_and_field(files, name):
    """Each fault: VCUInputError naming the file, the line and the field (not a
    UnicodeDecodeError/OverflowError, and never accepted silently)."""
    file_name, data, field, line, match = FAULTS[name]
    path = files / file_name
    path.write_bytes(data)
    with pytest.raises(VCUInputError, match=match) as err:
        parse_manifest(str(path))
    msg = str(err.value)
    assert f'line {line}' in msg and f"field '{field}'" in msg and str(path) in msg, msg
    assert (err.value.line, err.value.field) == (line, field)
    msg.encode('utf-8')  # printable: undecodable bytes never reach the message raw


@pytest.mark.parametrize('name', list(FAULTS))
def test_manifest_faults_are_skipped_and_counted(files, name, caplog):
    file_name, data, field, line, match = FAULTS[name]
    path = files / file_name
    path.write_bytes(data)
    with caplog.at_level(logging.DEBUG, logger='vdot_ext.patches.manifest'):
        rows, errors = parse_manifest(str(path), skip_bad=True)
    assert [r.prompt for r in rows] == ['ok']
    assert len(errors) == 1 and (errors[0].line, errors[0].field) == (line, field)
    assert re.search(match, str(errors[0]))
    summaries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(summaries) == 1 and '1 row(s) skipped' in summaries[0].getMessage()
    assert f"1 × '{field}'" in summaries[0].getMessage()


def test_bom_and_spreadsheet_csv_simply_work(files):
    """A CSV saved by a spreadsheet (UTF-8 with BOM, CRLF, quoted multi-line
    caption) parses like the plain file; line numbers count physical lines."""
    rows = [dict(id='a', task='grey', prompt='first', video='data/gt.mp4'),
            dict(id='b', task='grey', prompt='two\nlines', video='data/gt.mp4'),
            dict(id='c', task='grey', prompt='third', video='data/gt.mp4')]
    plain = write_csv(files / 'plain.csv', rows, ['id', 'task', 'prompt', 'video'])
    with open(files / 'excel.csv', 'w', newline='', encoding='utf-8-sig') as handle:
        writer = csv.DictWriter(handle, fieldnames=['id', 'task', 'prompt', 'video'], lineterminator='\r\n')
        writer.writeheader()
        writer.writerows(rows)
    assert (files / 'excel.csv').read_bytes().startswith(b'\xef\xbb\xbfid,')
    for skip in (False, True):
        parsed, errors = parse_manifest(str(files / 'excel.csv'), skip_bad=skip)
        expected, _ = parse_manifest(plain)
        assert errors == [] and [(r.sample_id, r.prompt, r.line) for r in parsed] == \
            [(r.sample_id, r.prompt, r.line) for r in expected] == [('a', 'first', 2), ('b', 'two\nlines', 3),
                                                                    ('c', 'third', 5)]
    (files / 'bom.jsonl').write_bytes(b'\xef\xbb\xbf' + GOOD + GOOD.replace(b'"ok"', b'"ok2"'))
    for skip in (False, True):
        parsed, errors = parse_manifest(str(files / 'bom.jsonl'), skip_bad=skip)
        assert errors == [] and [r.prompt for r in parsed] == ['ok', 'ok2']


def test_utf16_manifest_is_one_clear_error(files):
    (files / 'u16.jsonl').write_bytes(GOOD.decode().encode('utf-16'))
    for skip in (False, True):
        with pytest.raises(VCUInputError, match='UTF-16 encoded.*save it as UTF-8'):
            parse_manifest(str(files / 'u16.jsonl'), skip_bad=skip)


def test_unreadable_header_is_an_error_in_both_modes(files):
    (files / 'h.csv').write_bytes(b'task,pr\xf6mpt,video\ngrey,x,data/gt.mp4\n')
    for skip in (False, True):
        with pytest.raises(VCUInputError, match=r"line 1: the header row holds non-UTF-8 byte 0xf6") as err:
            parse_manifest(str(files / 'h.csv'), skip_bad=skip)
        assert "field 'header'" in str(err.value) and 'h.csv' in str(err.value)


def test_skip_summary_counts_every_reason(files, caplog):
    data = b''.join(FAULTS[name][1].split(b'\n', 1)[1] for name in FAULTS if FAULTS[name][0] == 'm.jsonl')
    (files / 'many.jsonl').write_bytes(GOOD + data)
    with caplog.at_level(logging.WARNING, logger='vdot_ext.patches.manifest'):
        rows, errors = parse_manifest(str(files / 'many.jsonl'), skip_bad=True)
    jsonl_faults = [n for n in FAULTS if FAULTS[n][0] == 'm.jsonl']
    assert len(rows) == 1 and len(errors) == len(jsonl_faults)
    assert [e.line for e in errors] == list(range(2, 2 + len(jsonl_faults)))
    (summary,) = caplog.records
    assert f'1 of {1 + len(jsonl_faults)} rows usable' in summary.getMessage()
    assert summarize_errors(errors) in summary.getMessage()
    assert "× 'prompt'" in summary.getMessage() and "× 'frame_start'" in summary.getMessage()


def test_option_errors_name_the_line_and_conflicts_with_the_task_name_are_refused(files):
    rows = [dict(id='a', task='outpainting', prompt='sea', video='data/gt.mp4', expand_ratio='-1'),
            dict(id='b', task='lastclip', prompt='x', video='data/gt.mp4',
                 options='{"extension_mode": "firstclip"}')]
    path = write_csv(files / 'opts.csv', rows, ['id', 'task', 'prompt', 'video', 'expand_ratio', 'options'])
    with pytest.raises(VCUInputError, match=r'line 2.*expand_ratio'):
        parse_manifest(path, check_files=False)
    parsed, errors = parse_manifest(path, check_files=False, skip_bad=True)
    assert parsed == [] and len(errors) == 2
    assert 'implies' in str(errors[1])
