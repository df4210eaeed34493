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

Relative paths resolve against the manifest's folder.

Reading (docs/DESIGN.md §11): the file is UTF-8; a leading byte-order mark
(what spreadsheets write) is dropped. Every problem is a :class:`VCUInputError`
naming the file, the line and the field, among them: bytes that are not UTF-8
(the byte and its position), a malformed JSONL line (the last key before the
syntax error), a CSV row with more values than the header has columns, a
non-finite number (``inf``/``nan``/``NaN``/``Infinity``) in a frame index, box
or option, and a text field (``prompt``, ``task``, a path ...) that is not a
string (a JSON number, list or ``null``). With ``skip_bad=True`` each such row
is dropped and returned with its error, and one summary is logged; only a
broken header (the whole file unreadable) still raises.
"""
import csv
import io
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .tasks import DEFAULT_OPTIONS, TASKS, TaskOptionError, merge_options, resolve_task
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
TEXT_FIELDS = ('task', 'prompt', 'negative_prompt') + PATH_FIELDS  # must be JSON strings
BOM = '\ufeff'
# bytes that are not UTF-8, decoded with 'surrogateescape' (byte b → U+DC00 + b)
_UNDECODABLE = re.compile('[\udc80-\udcff]')
_JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


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
        """``'<id> (<manifest file> line <n>)'``: what logs, errors and the
        dataset's ``sample_id`` call this sample."""
        return _where(self.sample_id, self.manifest, self.line)

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


def _where(sample_id: str, manifest: str, line: int) -> str:
    return f'{sample_id} ({os.path.basename(manifest)} line {line})'


def _row_error(manifest: str, line: int, field_name: str, message: str,
               sample_id: Optional[str] = None, path: Optional[str] = None) -> VCUInputError:
    """A :class:`VCUInputError` for one manifest line (``line`` and ``sample_id``
    kept as attributes for the skip report)."""
    sample_id = sample_id or f'line{line}'
    return VCUInputError(message, _where(sample_id, manifest, line), field_name, path or manifest,
                         line=line, sample_id=sample_id)


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == '')


# ------------------------------------------------------------------ bytes → records
def _undecodable(text: str) -> Optional[str]:
    """Where ``text`` (decoded with 'surrogateescape') holds non-UTF-8 bytes, or None."""
    found = _UNDECODABLE.search(text)
    if found is None:
        return None
    return f'byte 0x{ord(found.group()) - 0xdc00:02x} at character {found.start() + 1}'


def _find_undecodable(value) -> Optional[str]:
    if isinstance(value, str):
        return _undecodable(value)
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = (_undecodable(key) if isinstance(key, str) else None) or _find_undecodable(item)
        if found:
            return found
    return None


def _safe_text(text: str) -> str:
    """``text`` printable whatever it holds (undecodable bytes as ``\\xNN``)."""
    return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


Record = Union[dict, VCUInputError]


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise VCUInputError('no such manifest file', field='manifest', path=path)
    try:
        with open(path, 'rb') as handle:
            data = handle.read()
    except OSError as exc:
        raise VCUInputError(f'cannot read the manifest ({exc.strerror})', field='manifest',
                            path=path) from None
    if data.startswith((b'\xff\xfe', b'\xfe\xff')):  # "Unicode" in Windows editors: no line is readable
        raise VCUInputError('the manifest is UTF-16 encoded (byte-order mark); save it as UTF-8',
                            field='manifest', path=path)
    return data


def _jsonl_records(path: str, data: bytes) -> Iterator[Tuple[int, Record]]:
    for number, raw in enumerate(data.split(b'\n'), start=1):
        # undecodable bytes survive as surrogates: parse_row names their field
        text = raw.decode('utf-8', 'surrogateescape')
        if text.startswith(BOM):
            text = text[1:]
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            keys = _JSON_KEY.findall(text[:exc.pos])
            where = _safe_text(keys[-1]) if keys else 'record'
            bad = _undecodable(text)
            also = f'; the line also holds non-UTF-8 {bad}' if bad else ''
            after = f", after key '{where}'" if keys else ''
            yield number, _row_error(path, number, where, f'not valid JSON ({exc.msg} at column '
                                     f'{exc.colno}{after}){also}')
            continue
        if not isinstance(record, dict):
            yield number, _row_error(path, number, 'record',
                                     f'not a JSON object (a {type(record).__name__})')
            continue
        yield number, record


def _csv_records(path: str, data: bytes, delimiter: str) -> Iterator[Tuple[int, Record]]:
    text = data.decode('utf-8', 'surrogateescape')
    if text.startswith(BOM):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=''), delimiter=delimiter)
    header: Optional[List[str]] = None
    while header is None:  # the first non-blank row
        try:
            values = next(reader)
        except StopIteration:
            raise VCUInputError('CSV has no header row', field='manifest', path=path) from None
        except csv.Error as exc:
            raise VCUInputError(f'line {reader.line_num}: unreadable CSV header ({exc})',
                                field='header', path=path) from None
        if values and not all(_empty(v) for v in values):
            header = [v.strip() for v in values]
    bad = _find_undecodable(header)
    if bad:  # no row can be read without its column names: an error in both modes
        raise VCUInputError(f'line {reader.line_num}: the header row holds non-UTF-8 {bad}; '
                            'save the manifest as UTF-8', field='header', path=path)
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise VCUInputError(f'line {reader.line_num}: columns {repeated} appear more than once',
                            field='header', path=path)
    while True:
        line = reader.line_num + 1  # a quoted field may span lines: the row's first line
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, _row_error(path, line, 'record', f'unreadable CSV row ({exc})')
            continue
        if not values or all(_empty(v) for v in values):
            continue
        extra = [v for v in values[len(header):] if not _empty(v)]
        if extra:
            yield line, _row_error(path, line, 'record',
                                   f'{len(values)} values, but the header has {len(header)} '
                                   'columns (a delimiter inside an unquoted field?)')
            continue
        yield line, {name: value for name, value in zip(header, values) if name}


def _read_records(path: str) -> List[Tuple[int, Record]]:
    """``(line, record or the line's error)`` for every non-blank line."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in ('.jsonl', '.ndjson', '.csv', '.tsv'):
        raise VCUInputError(f'unknown manifest type {ext!r}: expected .csv, .tsv or .jsonl',
                            field='manifest', path=path)
    data = _read_bytes(path)
    if ext in ('.jsonl', '.ndjson'):
        return list(_jsonl_records(path, data))
    return list(_csv_records(path, data, '\t' if ext == '.tsv' else ','))


# ------------------------------------------------------------------ values
def _is_nonfinite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_is_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_nonfinite(v) for v in value)
    return False


def _as_list(value) -> List[str]:
    if _empty(value):
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip()
        if text.startswith('['):
            items = json.loads(text)
            if not isinstance(items, list):
                raise TypeError(f'expected a list, got {text!r}')
        else:
            for sep in (';', '|'):
                if sep in text:
                    return [p.strip() for p in text.split(sep) if p.strip()]
            return [text]
    bad = [v for v in items if not isinstance(v, str) and v is not None]
    if bad:
        raise TypeError(f'expected paths (strings), got {bad[0]!r}')
    return [v for v in items if not _empty(v)]


def _as_box(value, name):
    from .conditions import box_from_value
    if _empty(value):
        return None
    if isinstance(value, str) and value.strip().startswith('['):
        value = json.loads(value)
    elif isinstance(value, str):
        value = [v for v in value.split(',') if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'expected [x0, y0, x1, y1], got {value!r}')
    numbers = []
    for v in value:
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise ValueError(f'expected [x0, y0, x1, y1] numbers, got {value!r}') from None
        if isinstance(v, bool) or not math.isfinite(number):
            raise ValueError(f'expected finite numbers [x0, y0, x1, y1], got {value!r}')
        numbers.append(number)
    try:
        return box_from_value(numbers, name)
    except ValueError as exc:
        raise ValueError(str(exc).split(': ', 1)[-1]) from None


def _as_int(value) -> Optional[int]:
    """An integer from an int, an integral float or its text; ``inf``/``nan``,
    fractions, booleans and other types are refused."""
    if _empty(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f'expected an integer, got {value!r}')
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f'expected an integer, got {value!r}') from None
    if not math.isfinite(number):
        raise ValueError(f'expected a finite integer, got {value!r}')
    if number != int(number):
        raise ValueError(f'expected an integer, got {value!r}')
    return int(number)


def _parse_option(key, value):
    if isinstance(value, str):
        text = value.strip()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return value


def _type_name(value) -> str:
    return 'null' if value is None else type(value).__name__


def parse_row(line: int, record: dict, manifest: str, check_files: bool = True) -> ManifestRow:
    """Validate one record into a :class:`ManifestRow` (raises VCUInputError)."""
    base = os.path.dirname(os.path.abspath(manifest))

    def err(msg, fld, path=None, sample_id=None):
        return _row_error(manifest, line, fld, msg, sample_id, path)

    # bytes first: nothing below may print an undecodable value
    for column, value in record.items():
        bad = _undecodable(str(column)) or _find_undecodable(value)
        if bad:
            name = COLUMN_ALIASES.get(str(column).strip().lower(), _safe_text(str(column)))
            raise err(f'non-UTF-8 {bad} in column {_safe_text(str(column))!r}; save the '
                      'manifest as UTF-8', name)
    fields: Dict[str, object] = {}
    source_column: Dict[str, str] = {}
    options: Dict[str, object] = {}
    nulls = set()
    for column, value in record.items():
        key = str(column).strip()
        lower = key.lower()
        if lower in DEFAULT_OPTIONS:
            if not _empty(value):
                options[lower] = _parse_option(lower, value)
            continue
        canon = COLUMN_ALIASES.get(lower)
        if canon is None:
            continue
        if value is None:
            nulls.add(canon)
        if _empty(value):
            continue
        if canon in fields:
            raise err(f'columns {source_column[canon]!r} and {key!r} both give {canon!r}', canon)
        fields[canon] = value
        source_column[canon] = key
    raw_id = fields.get('id')
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise err(f'id must be a string or an integer, got {_type_name(raw_id)} {raw_id!r}', 'id')
    sample_id = f'line{line}' if raw_id is None else str(raw_id).strip()

    def err(msg, fld, path=None):  # redefined: now with the row's id
        return _row_error(manifest, line, fld, msg, sample_id, path)

    for name in TEXT_FIELDS:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise err(f'{name} must be a string, got {_type_name(value)} {value!r}', name)
    if _empty(fields.get('task')):
        raise err("no task (column 'task' or 'task_name')", 'task')
    try:
        task, implied = resolve_task(str(fields['task']))
    except KeyError as exc:
        raise err(str(exc.args[0]), 'task') from None
    prompt = fields.get('prompt')
    if _empty(prompt):
        got = 'null' if 'prompt' in nulls else repr(prompt or '')
        raise err(f"empty prompt (column 'prompt' or 'internvl_short'; got {got}); expected a "
                  'non-empty string', 'prompt')

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
    for name, value in options.items():
        if _is_nonfinite(value):
            raise err(f'option {name}: expected finite numbers, got {value!r}', name)
    # a task name that implies an option (``lastclip`` -> extension_mode) must
    # not be silently overridden by, or override, the row's own value
    conflicts = [f'{k}={options[k]!r} (task {fields["task"]!r} implies {v!r})'
                 for k, v in implied.items() if k in options and options[k] != v]
    if conflicts:
        raise err(f'options conflict with the task name: {conflicts}', 'options')
    options.update(implied)
    # checked here, so that a bad value is reported with its line number
    try:
        merge_options(options)
    except TaskOptionError as exc:
        raise err(exc.detail, exc.field) from None

    numbers = {}
    for name in ('frame_start', 'frame_end', 'ref_frame'):
        try:
            numbers[name] = _as_int(fields.get(name))
        except ValueError as exc:
            raise err(f'{name}: {exc}', name) from None
    boxes = {}
    for name in ('box', 'ref_box'):
        try:
            boxes[name] = _as_box(fields.get(name), name)
        except (ValueError, json.JSONDecodeError) as exc:
            raise err(f'{name}: {exc}', name) from None
    frame_start, frame_end = numbers['frame_start'] or 0, numbers['frame_end']
    if frame_start < 0 or (frame_end is not None and frame_end <= frame_start):
        raise err(f'frame range [{frame_start}, {frame_end}) is empty or negative',
                  'frame_start/frame_end')
    ref_frame = numbers['ref_frame'] or 0
    if ref_frame < 0:
        raise err(f'ref_frame must be >= 0, got {ref_frame}', 'ref_frame')

    spec = TASKS[task]
    if spec.control in ('depth', 'pose') and 'condition' not in paths:
        raise err(f"task {task!r} needs a {spec.control} video (column 'condition' or "
                  "'src_video_path')", 'condition')
    if spec.uses_refs and not refs and boxes['ref_box'] is None:
        raise err(f"task {task!r} needs reference images (column 'ref_images' or "
                  "'ref_image_path') or a 'ref_box'", 'ref_images')
    if task == 'inpaint' and 'mask' not in paths and boxes['box'] is None:
        raise err("task 'inpaint' needs a mask (column 'mask') or a 'box'", 'mask')
    return ManifestRow(line=line, sample_id=sample_id, task=task, prompt=prompt.strip(),
                       video=paths['video'], options=options,
                       negative_prompt=None if _empty(fields.get('negative_prompt'))
                       else fields['negative_prompt'],
                       condition=paths.get('condition'), mask=paths.get('mask'), ref_images=refs,
                       frame_start=frame_start, frame_end=frame_end, box=boxes['box'],
                       ref_box=boxes['ref_box'], ref_frame=ref_frame, raw=dict(record),
                       manifest=os.path.abspath(manifest))


def detect_layout(columns) -> str:
    """``'vdot'`` when the public VDOT CSV columns are present, else ``'vdot_ext'``."""
    lower = {str(c).strip().lower() for c in columns}
    return 'vdot' if {'task_name', 'src_video_path'} <= lower else 'vdot_ext'


def summarize_errors(errors: Sequence[VCUInputError], limit: int = 3) -> str:
    """One line: how many rows were skipped, per field, and the first messages."""
    if not errors:
        return 'no rows skipped'
    per_field = Counter(e.field or 'manifest' for e in errors)
    counts = ', '.join(f'{n} × {name!r}' for name, n in per_field.most_common())
    first = ' | '.join(str(e) for e in errors[:limit])
    more = f' (+{len(errors) - limit} more)' if len(errors) > limit else ''
    return f'{len(errors)} row(s) skipped, by field: {counts}. First: {first}{more}'


def parse_manifest(path: str, check_files: bool = True, skip_bad: bool = False
                   ) -> Tuple[List[ManifestRow], List[VCUInputError]]:
    """All rows of a CSV/JSONL manifest.

    Returns ``(rows, errors)``. With ``skip_bad=False`` the first bad row raises;
    with ``skip_bad=True`` bad rows are dropped, returned in ``errors`` (each with
    ``line``, ``field``, ``sample_id``) and summarised in one logged warning
    (:func:`summarize_errors`; each row at DEBUG level). Duplicate sample ids are
    an error. A file that cannot be read at all (missing, unknown type, broken
    header) raises in both modes.
    """
    records = _read_records(path)
    if not records:
        raise VCUInputError('manifest has no rows', field='manifest', path=path)
    rows: List[ManifestRow] = []
    errors: List[VCUInputError] = []
    seen: Dict[str, int] = {}
    for line, record in records:
        try:
            if isinstance(record, VCUInputError):
                raise record
            row = parse_row(line, record, path, check_files)
            if row.sample_id in seen:
                raise _row_error(path, line, 'id', f'duplicate sample id (also on line '
                                 f'{seen[row.sample_id]})', row.sample_id)
        except VCUInputError as exc:
            if not skip_bad:
                raise
            logger.debug(f'skipping manifest row: {exc}')
            errors.append(exc)
            continue
        seen[row.sample_id] = line
        rows.append(row)
    if errors:
        logger.warning(f'manifest {path}: {len(rows)} of {len(rows) + len(errors)} rows usable; '
                       f'{summarize_errors(errors)}')
    return rows, errors
