"""VCU manifests: CSV or JSONL, one row per sample.

Columns (this project's layout)::

    id              optional sample name (default: the row number)
    task            a task of :mod:`vdot_ext.patches.tasks` or an alias (required)
    prompt          the caption (required, non-empty)
    negative_prompt optional
    video           the ground-truth video (required)
    condition       source/condition video: depth or pose video (required for
                    those), or a precomputed grey/scribble/flow/outpaint source
    mask            mask video or one mask image (white = generate)
    ref_images      reference image path(s): JSON list, or ';'/'|'-separated
    frame_start     first frame of the clip in the files (default 0)
    frame_end       end of the range, exclusive (default: the file's length)
    box             [x0, y0, x1, y1] source pixels: inpainting box
    ref_box         [x0, y0, x1, y1] source pixels: reference crop from the video
                    (used when the row has no ref_images)
    ref_frame       clip frame the reference crop is taken from (default 0)
    options         JSON object of task options (see ``tasks.DEFAULT_OPTIONS``);
                    option names are also accepted as their own columns

The public VDOT CSV columns are accepted too: ``task_name`` → task,
``src_video_path`` → condition, ``mask_video_path`` → mask, ``ref_image_path``
→ ref_images, ``internvl_short`` → prompt, and the ground truth from
``video_path``/``gt_video_path``/``tgt_video_path``/``target_video_path``/
``ori_video_path``. When such a CSV has no ground-truth column, its
``src_video_path`` is taken as the source video (conditions derived from it);
tasks whose control needs a model (depth, pose) then fail with an error naming
the missing column.

Relative paths resolve against the manifest's folder. Problems are
:class:`VCUInputError` naming the manifest line, the field and the file.
"""
import csv
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .tasks import DEFAULT_OPTIONS, TASKS, resolve_task
from .video_reader import VCUInputError

logger = logging.getLogger(__name__)

# column name → canonical field (first matching column wins; two non-empty
# columns for one field are an error)
COLUMN_ALIASES = {
    'id': 'id', 'sample_id': 'id', 'name': 'id',
    'task': 'task', 'task_name': 'task',
    'prompt': 'prompt', 'caption': 'prompt', 'text': 'prompt', 'internvl_short': 'prompt',
    'negative_prompt': 'negative_prompt',
    'video': 'video', 'video_path': 'video', 'gt_video': 'video', 'gt_video_path': 'video',
    'tgt_video_path': 'video', 'target_video_path': 'video', 'ori_video_path': 'video',
    'condition': 'condition', 'src_video': 'condition', 'src_video_path': 'condition',
    'condition_video': 'condition',
    'mask': 'mask', 'mask_video': 'mask', 'mask_video_path': 'mask', 'src_mask': 'mask',
    'ref_images': 'ref_images', 'ref_image': 'ref_images', 'ref_image_path': 'ref_images',
    'reference': 'ref_images', 'src_ref_images': 'ref_images',
    'frame_start': 'frame_start', 'frame_end': 'frame_end',
    'box': 'box', 'ref_box': 'ref_box', 'ref_frame': 'ref_frame', 'options': 'options',
}
VDOT_COLUMNS = ('task_name', 'src_video_path', 'mask_video_path', 'ref_image_path',
                'internvl_short')
PATH_FIELDS = ('video', 'condition', 'mask')


@dataclass
class ManifestRow:
    """One validated sample (paths absolute)."""
    line: int
    sample_id: str
    task: str
    prompt: str
    video: str
    options: dict = field(default_factory=dict)
    negative_prompt: Optional[str] = None
    condition: Optional[str] = None
    mask: Optional[str] = None
    ref_images: List[str] = field(default_factory=list)
    frame_start: int = 0
    frame_end: Optional[int] = None
    box: Optional[Tuple[float, float, float, float]] = None
    ref_box: Optional[Tuple[float, float, float, float]] = None
    ref_frame: int = 0
    raw: dict = field(default_factory=dict)
    manifest: str = ''

    @property
    def num_ref(self) -> int:
        """Reference frames this sample's VCU prepends (0 unless the task uses them)."""
        if not TASKS[self.task].uses_refs:
            return 0
        return len(self.ref_images) if self.ref_images else (1 if self.ref_box is not None else 0)

    def describe(self) -> str:
        return f'{self.sample_id} ({os.path.basename(self.manifest)} line {self.line})'

    def key_dict(self) -> dict:
        """What identifies the sample (for cache keys and its random choices): the
        id, paths relative to the manifest, file sizes, every VCU-relevant field."""
        base = os.path.dirname(os.path.abspath(self.manifest))

        def rel(p):
            if p is None:
                return None
            size = os.path.getsize(p) if os.path.isfile(p) else -1
            return [os.path.relpath(p, base), size]
        return dict(id=self.sample_id, task=self.task, prompt=self.prompt, negative_prompt=self.negative_prompt,
                    video=rel(self.video), condition=rel(self.condition), mask=rel(self.mask),
                    ref_images=[rel(p) for p in self.ref_images], frame_start=self.frame_start,
                    frame_end=self.frame_end, box=self.box, ref_box=self.ref_box,
                    ref_frame=self.ref_frame, options=self.options)


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == '')


def _read_records(path: str) -> List[Tuple[int, dict]]:
    if not os.path.isfile(path):
        raise VCUInputError('no such manifest file', field='manifest', path=path)
    ext = os.path.splitext(path)[1].lower()
    records: List[Tuple[int, dict]] = []
    if ext in ('.jsonl', '.ndjson'):
        with open(path, encoding='utf-8') as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise VCUInputError(f'line {number} is not valid JSON ({exc.msg})',
                                        field='manifest', path=path) from None
                if not isinstance(record, dict):
                    raise VCUInputError(f'line {number} is not a JSON object',
                                        field='manifest', path=path)
                records.append((number, record))
    elif ext in ('.csv', '.tsv'):
        with open(path, encoding='utf-8', newline='') as handle:
            reader = csv.DictReader(handle, delimiter='\t' if ext == '.tsv' else ',')
            if not reader.fieldnames:
                raise VCUInputError('CSV has no header row', field='manifest', path=path)
            for number, record in enumerate(reader, start=2):  # line 1 = header
                if all(_empty(v) for v in record.values()):
                    continue
                records.append((number, {k.strip(): v for k, v in record.items() if k}))
    else:
        raise VCUInputError(f'unknown manifest type {ext!r}: expected .csv, .tsv or .jsonl',
                            field='manifest', path=path)
    return records


def _as_list(value) -> List[str]:
    if _empty(value):
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if not _empty(v)]
    text = str(value).strip()
    if text.startswith('['):
        return [str(v) for v in json.loads(text) if not _empty(v)]
    for sep in (';', '|'):
        if sep in text:
            return [p.strip() for p in text.split(sep) if p.strip()]
    return [text]


def _as_box(value, name):
    from .conditions import box_from_value
    if _empty(value):
        return None
    if isinstance(value, str) and value.strip().startswith('['):
        value = json.loads(value)
    return box_from_value(value, name)


def _as_int(value, name) -> Optional[int]:
    if _empty(value):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{name}: expected an integer, got {value!r}') from None
    if f != int(f):
        raise ValueError(f'{name}: expected an integer, got {value!r}')
    return int(f)


def _parse_option(key, value):
    if isinstance(value, str):
        text = value.strip()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if key == 'outpaint_directions':
                return [d.strip() for d in text.replace(';', ',').split(',') if d.strip()]
            return text
    return value


def parse_row(line: int, record: dict, manifest: str, check_files: bool = True) -> ManifestRow:
    """Validate one record into a :class:`ManifestRow` (raises VCUInputError)."""
    base = os.path.dirname(os.path.abspath(manifest))
    fields: Dict[str, object] = {}
    source_column: Dict[str, str] = {}
    options: Dict[str, object] = {}
    for column, value in record.items():
        key = str(column).strip()
        lower = key.lower()
        if lower in DEFAULT_OPTIONS:
            if not _empty(value):
                options[lower] = _parse_option(lower, value)
            continue
        canon = COLUMN_ALIASES.get(lower)
        if canon is None or _empty(value):
            continue
        if canon in fields:
            raise VCUInputError(f'columns {source_column[canon]!r} and {key!r} both give '
                                f'{canon!r}', f'line {line}', canon, manifest)
        fields[canon] = value
        source_column[canon] = key
    sample_id = str(fields.get('id', f'line{line}'))
    where = f'{sample_id} ({os.path.basename(manifest)} line {line})'

    def err(msg, fld, path=None):
        exc = VCUInputError(msg, where, fld, path or manifest)
        exc.sample_id = sample_id
        return exc

    if _empty(fields.get('task')):
        raise err("no task (column 'task' or 'task_name')", 'task')
    try:
        task, implied = resolve_task(str(fields['task']))
    except KeyError as exc:
        raise err(str(exc.args[0]), 'task') from None
    prompt = fields.get('prompt')
    if _empty(prompt):
        raise err("empty prompt (column 'prompt' or 'internvl_short')", 'prompt')

    # public VDOT layout without a ground-truth column: src video is the source
    if 'video' not in fields and 'condition' in fields:
        spec = TASKS[task]
        if spec.control in ('depth', 'pose'):
            raise err(f"task {task!r} needs the ground-truth video (a 'video'/'video_path' "
                      f"column) besides the {spec.control} video in "
                      f"{source_column['condition']!r}", 'video')
        fields['video'] = fields.pop('condition')
        source_column['video'] = source_column.pop('condition')
    if _empty(fields.get('video')):
        raise err("no ground-truth video (column 'video' or 'video_path')", 'video')

    def resolve(p):
        p = os.path.expanduser(str(p).strip())
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    paths = {k: resolve(fields[k]) for k in PATH_FIELDS if not _empty(fields.get(k))}
    try:
        refs = [resolve(p) for p in _as_list(fields.get('ref_images'))]
    except (json.JSONDecodeError, TypeError) as exc:
        raise err(f'cannot parse the reference list ({exc})', 'ref_images') from None
    if check_files:
        for k, p in paths.items():
            if not os.path.isfile(p):
                raise err('no such file', k, p)
        for p in refs:
            if not os.path.isfile(p):
                raise err('no such file', 'ref_images', p)

    raw_options = fields.get('options')
    if not _empty(raw_options):
        if isinstance(raw_options, str):
            try:
                raw_options = json.loads(raw_options)
            except json.JSONDecodeError as exc:
                raise err(f'options is not a JSON object ({exc.msg})', 'options') from None
        if not isinstance(raw_options, dict):
            raise err(f'options must be a JSON object, got {raw_options!r}', 'options')
        options = dict(raw_options, **options)
    unknown = [k for k in options if k not in DEFAULT_OPTIONS]
    if unknown:
        raise err(f'unknown task options {unknown}; known: {sorted(DEFAULT_OPTIONS)}', 'options')
    options.update(implied)

    try:
        frame_start = _as_int(fields.get('frame_start'), 'frame_start') or 0
        frame_end = _as_int(fields.get('frame_end'), 'frame_end')
        ref_frame = _as_int(fields.get('ref_frame'), 'ref_frame') or 0
        box = _as_box(fields.get('box'), 'box')
        ref_box = _as_box(fields.get('ref_box'), 'ref_box')
    except (ValueError, json.JSONDecodeError) as exc:
        raise err(str(exc), str(exc).split(':')[0] if ':' in str(exc) else 'frame range') from None
    if frame_start < 0 or (frame_end is not None and frame_end <= frame_start):
        raise err(f'frame range [{frame_start}, {frame_end}) is empty or negative',
                  'frame_start/frame_end')

    spec = TASKS[task]
    if spec.control in ('depth', 'pose') and 'condition' not in paths:
        raise err(f"task {task!r} needs a {spec.control} video (column 'condition' or "
                  "'src_video_path')", 'condition')
    if spec.uses_refs and not refs and ref_box is None:
        raise err(f"task {task!r} needs reference images (column 'ref_images' or "
                  "'ref_image_path') or a 'ref_box'", 'ref_images')
    if task == 'inpaint' and 'mask' not in paths and box is None:
        raise err("task 'inpaint' needs a mask (column 'mask') or a 'box'", 'mask')
    return ManifestRow(line=line, sample_id=sample_id, task=task, prompt=str(prompt).strip(),
                       video=paths['video'], options=options,
                       negative_prompt=None if _empty(fields.get('negative_prompt'))
                       else str(fields['negative_prompt']),
                       condition=paths.get('condition'), mask=paths.get('mask'), ref_images=refs,
                       frame_start=frame_start, frame_end=frame_end, box=box, ref_box=ref_box,
                       ref_frame=ref_frame, raw=dict(record), manifest=os.path.abspath(manifest))


def detect_layout(columns) -> str:
    """``'vdot'`` when the public VDOT CSV columns are present, else ``'vdot_ext'``."""
    lower = {str(c).strip().lower() for c in columns}
    return 'vdot' if {'task_name', 'src_video_path'} <= lower else 'vdot_ext'


def parse_manifest(path: str, check_files: bool = True, skip_bad: bool = False
                   ) -> Tuple[List[ManifestRow], List[VCUInputError]]:
    """All rows of a CSV/JSONL manifest.

    Returns ``(rows, errors)``. With ``skip_bad=False`` the first bad row raises;
    with ``skip_bad=True`` bad rows are dropped, returned in ``errors`` and each
    logged once. Duplicate sample ids are an error.
    """
    records = _read_records(path)
    if not records:
        raise VCUInputError('manifest has no rows', field='manifest', path=path)
    rows: List[ManifestRow] = []
    errors: List[VCUInputError] = []
    seen: Dict[str, int] = {}
    for line, record in records:
        try:
            row = parse_row(line, record, path, check_files)
            if row.sample_id in seen:
                raise VCUInputError(f'duplicate sample id (also on line {seen[row.sample_id]})',
                                    f'{row.sample_id} (line {line})', 'id', path)
        except VCUInputError as exc:
            if not skip_bad:
                raise
            logger.warning(f'skipping manifest row: {exc}')
            errors.append(exc)
            continue
        seen[row.sample_id] = line
        rows.append(row)
    return rows, errors
