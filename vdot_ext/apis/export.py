"""A trained student in the release layout of Wan2.1 / VACE-Wan2.1 (docs/DESIGN.md §8).

The layout is the one the official releases use and that diffsynth, the VACE and
Wan scripts and ComfyUI loaders read::

    <out_dir>/
      diffusion_pytorch_model-00001-of-0000N.safetensors     the DiT (and VACE) tensors,
      ...                                                    official key names, no prefix
      diffusion_pytorch_model.safetensors.index.json         {"metadata": {"total_size"},
                                                              "weight_map": {key: shard}}
      config.json                                            the architecture, Wan2.1's own
                                                             config fields ("_class_name":
                                                             "WanModel" | "VaceWanModel")
      vdot_student.json                                      the few-step sampler of the
                                                             student and where it came from

Key map: ``WanVACEScore`` holds diffsynth's ``WanModel`` as ``dit`` and its
``VaceWanModel`` as ``vace``; the release stores both side by side without those
prefixes (``blocks.0.self_attn.q.weight``, ``vace_blocks.0.before_proj.weight``),
which is what diffsynth's ``WanVideoDiTStateDictConverter`` and
``VaceWanModelDictConverter`` split again. At the real sizes the key set and
shapes are byte-for-byte those of the official files, so diffsynth's
``ModelPool`` recognises an export by its hash (md5 of keys and shapes) like the
release itself; other sizes (tiny test models, custom widths) are recognised after
:func:`register_with_diffsynth` adds their entries.

:func:`export_generator` is what a training run calls at its end (docs/DESIGN.md §7):
it takes the live generator module (LoRA merged on the fly, ZeRO-3 shards gathered
one output shard at a time, so no process holds two full copies), a state dict, or
a checkpoint path, optionally with EMA weights, and writes the folder atomically
(a reader sees the old export or the new one, never half of one).
"""
import contextlib
import json
import math
import os
import os.path as osp
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from vdot_ext.utils import assert_finite_state_dict, atomic_write, barrier, is_main_process, write_json

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
INDEX_NAME = 'diffusion_pytorch_model.safetensors.index.json'
CONFIG_NAME = 'config.json'
STUDENT_NAME = 'vdot_student.json'
SHARD_PATTERN = 'diffusion_pytorch_model-{index:05d}-of-{total:05d}.safetensors'
# Wan2.1's own config.json fields (Wan-AI/Wan2.1-*: "_diffusers_version": "0.30.0")
DIFFUSERS_VERSION = '0.30.0'
TEXT_LEN = 512
DEFAULT_SAMPLER = dict(timesteps=[1000, 750, 500, 250], shift=5.0, renoise='fresh')

_UNITS = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}
_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16,
           'float16': torch.float16, 'fp32': torch.float32, 'float32': torch.float32}


# ---------------------------------------------------------------------------
# names, sizes, architecture
# ---------------------------------------------------------------------------
def parse_size(size: Union[int, str], field_name: str = 'max_shard_size') -> int:
    """``'5GB'`` → 5·10⁹ bytes (``GiB`` = 2³⁰, as Hugging Face's ``max_shard_size``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B)\s*', str(size).upper())
        if not match:
            raise ValueError(f'{field_name}: expected bytes or a size like "5GB" / "500MiB", got {size!r}')
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f'{field_name}: must be > 0, got {size!r}')
    return value


def as_dtype(dtype, field_name: str = 'dtype') -> Optional[torch.dtype]:
    """None, a torch dtype, or one of ``bf16``/``fp16``/``fp32`` (and the long names)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace('torch.', '').lower()
    if key not in _DTYPES:
        raise ValueError(f'{field_name}: expected one of {sorted(_DTYPES)}, got {dtype!r}')
    return _DTYPES[key]


def release_key(student_key: str) -> str:
    """``dit.blocks.0.x`` → ``blocks.0.x``; ``vace.vace_blocks.0.x`` → ``vace_blocks.0.x``."""
    for prefix in ('dit.', 'vace.'):
        if student_key.startswith(prefix):
            return student_key[len(prefix):]
    raise KeyError(f'{student_key!r} is not a WanVACEScore key (expected a "dit." or "vace." prefix)')


def student_key(release_name: str) -> str:
    """Inverse of :func:`release_key` (VACE keys start with ``vace_``)."""
    return ('vace.' if release_name.startswith('vace_') else 'dit.') + release_name


def _natural(key: str):
    return tuple(int(p) if p.isdigit() else p for p in key.split('.'))


def release_config(arch: Mapping) -> dict:
    """Wan2.1's ``config.json`` for an architecture (``WanVACEScore.arch``).

    The fields are those of the official releases (``_class_name``, ``model_type``,
    ``dim``, ``ffn_dim``, ``num_heads``, ...; ``vace_layers``/``vace_in_dim`` for VACE)
    plus ``text_dim`` and ``patch_size``, arguments of Wan's own ``WanModel`` that
    the releases leave at their defaults (4096, [1, 2, 2]).
    """
    vace = arch.get('vace_layers') is not None
    config = {
        '_class_name': 'VaceWanModel' if vace else 'WanModel',
        '_diffusers_version': DIFFUSERS_VERSION,
        'model_type': 'vace' if vace else 't2v',
        'dim': int(arch['dim']), 'eps': float(arch['eps']), 'ffn_dim': int(arch['ffn_dim']),
        'freq_dim': int(arch['freq_dim']), 'in_dim': int(arch['in_dim']),
        'num_heads': int(arch['num_heads']), 'num_layers': int(arch['num_layers']),
        'out_dim': int(arch['out_dim']), 'text_len': TEXT_LEN, 'text_dim': int(arch['text_dim']),
        'patch_size': [int(p) for p in arch['patch_size']],
    }
    if vace:
        config['vace_layers'] = [int(i) for i in arch['vace_layers']]
        config['vace_in_dim'] = int(arch['vace_in_dim'])
    return config


def arch_from_release_config(config: Mapping, source: str = CONFIG_NAME) -> dict:
    """``WanVACEScore`` keyword arguments from a release ``config.json`` (ours or Wan-AI's)."""
    missing = [k for k in ('dim', 'ffn_dim', 'num_heads', 'num_layers', 'freq_dim') if k not in config]
    if missing:
        raise ValueError(f'{source}: missing architecture field(s) {missing} (a Wan2.1 config.json '
                         'has dim, ffn_dim, num_heads, num_layers, freq_dim, ...)')
    vace = config.get('vace_layers')
    if config.get('model_type') == 'vace' and not vace:
        raise ValueError(f'{source}: model_type "vace" but no "vace_layers"')
    return dict(dim=int(config['dim']), ffn_dim=int(config['ffn_dim']), num_heads=int(config['num_heads']),
                num_layers=int(config['num_layers']), freq_dim=int(config['freq_dim']),
                text_dim=int(config.get('text_dim', 4096)), in_dim=int(config.get('in_dim', 16)),
                out_dim=int(config.get('out_dim', 16)), eps=float(config.get('eps', 1e-6)),
                patch_size=tuple(int(p) for p in config.get('patch_size', (1, 2, 2))),
                vace_layers=tuple(int(i) for i in vace) if vace else (),
                vace_in_dim=int(config.get('vace_in_dim', 96)))


def read_release_config(folder: str) -> Optional[dict]:
    """The architecture of a release folder (its ``config.json``), or None without one."""
    path = osp.join(folder, CONFIG_NAME)
    if not osp.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f'{path}: not valid JSON ({exc})') from None
    return arch_from_release_config(config, path)


def read_student_info(folder: str) -> dict:
    """``vdot_student.json`` of an export (sampler, provenance), ``{}`` for other folders."""
    path = osp.join(folder, STUDENT_NAME)
    if not osp.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# tensor sources: what to write, fetched one shard at a time
# ---------------------------------------------------------------------------
@dataclass
class _Entry:
    key: str                        # release key
    shape: Tuple[int, ...]
    dtype: torch.dtype
    params: List[torch.Tensor]      # live tensors needed (module sources)
    make: Callable[[], torch.Tensor]  # the final CPU tensor, once `params` are gathered
    merged: bool = False            # a LoRA layer merged into this weight


def _numel(shape) -> int:
    return int(math.prod(shape))


def _gathered(tensors: Sequence[torch.Tensor]):
    """DeepSpeed ZeRO-3 ``GatheredParameters`` when any tensor is partitioned (a
    collective every rank must join), else nothing."""
    partitioned = [t for t in tensors if hasattr(t, 'ds_id')]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def _full_shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(getattr(t, 'ds_shape', t.shape))


def _state_dict_entries(state: Mapping[str, torch.Tensor]) -> List[_Entry]:
    """Entries of a flat state dict in ``WanVACEScore`` (``dit.``/``vace.``) or release layout."""
    if not state:
        raise ValueError('export_generator: the state dict is empty')
    student_layout = all(k.startswith(('dit.', 'vace.')) for k in state)
    entries = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f'export_generator: state[{key!r}] is a {type(value).__name__}, not a tensor')
        name = release_key(key) if student_layout else key
        entries.append(_Entry(name, tuple(value.shape), value.dtype, [],
                              lambda v=value: v.detach().to('cpu')))
    return entries


def _module_entries(module: nn.Module, ema: Optional[Mapping[str, torch.Tensor]]) -> List[_Entry]:
    """Entries of a live ``WanVACEScore`` (possibly peft-LoRA, possibly ZeRO-3
    partitioned): every un-adapted key, LoRA merged ``W' = W + (α/r)·B·A``
    (docs/DESIGN.md §7, Eq. 22), EMA tensors (by the module's own names) used in
    place of the live ones."""
    from vdot_ext.models.lora import BASE_MARK, LORA_MARK, has_lora, lora_scale
    named: Dict[str, torch.Tensor] = dict(module.named_parameters())
    named.update({k: v for k, v in module.state_dict(keep_vars=True).items() if k not in named})
    # kept as given: a lazy mapping (ExportGeneratorHook) gathers each EMA tensor only when its shard is built
    ema = ema if ema is not None else {}
    unknown = [k for k in ema if k not in named]
    if unknown:
        raise KeyError(f'export_generator: EMA tensors {unknown[:5]} are not in the module '
                       f'(e.g. {sorted(named)[:3]})')
    scale = lora_scale(module._vdot_lora_config) if has_lora(module) else None

    def value(name):
        return ema[name] if name in ema else named[name]

    def live(name):  # the tensor to gather (EMA values are full CPU tensors already)
        return [] if name in ema else [named[name]]

    adapters: Dict[str, Dict[str, str]] = {}
    for name in named:
        if LORA_MARK in name:
            layer, rest = name.split(LORA_MARK, 1)
            adapters.setdefault(layer, {})[rest.split('.', 1)[0]] = name
    entries = []
    for name, tensor in named.items():
        if LORA_MARK in name:
            continue
        if BASE_MARK in name:
            layer = name.split(BASE_MARK, 1)[0]
            out_name = name.replace(BASE_MARK, '.')
            parts = adapters.get(layer, {})
            if out_name.endswith('.weight') and {'A', 'B'} <= set(parts):
                a_name, b_name = parts['A'], parts['B']

                def make(w=name, a=a_name, b=b_name):
                    base = value(w).detach()
                    delta = value(b).detach().float() @ value(a).detach().float()
                    return (base.float() + scale * delta).to(base.dtype).cpu()
                entries.append(_Entry(release_key(out_name), _full_shape(tensor), tensor.dtype,
                                      live(name) + live(a_name) + live(b_name), make, merged=True))
                continue
            name_out = out_name
        else:
            name_out = name
        entries.append(_Entry(release_key(name_out), _full_shape(tensor), tensor.dtype, live(name),
                              lambda n=name: value(n).detach().to('cpu', copy=True)))
    return entries


def plan_shards(entries: Sequence[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Greedy sharding in order (Hugging Face's rule): a shard is closed when the
    next tensor would push it past ``max_bytes``; a tensor larger than the limit
    gets a shard of its own."""
    shards: List[List[str]] = []
    current: List[str] = []
    size = 0
    for key, nbytes in entries:
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What :func:`export_generator` wrote."""
    out_dir: str
    shards: List[str]
    num_tensors: int
    total_bytes: int
    config: dict
    student: dict
    diffsynth_hash: str = ''
    notes: List[str] = field(default_factory=list)


def diffsynth_hash(keys_and_shapes: Mapping[str, Sequence[int]]) -> str:
    """diffsynth's model hash of a file set (``hash_model_file``: md5 of the sorted
    ``key:shape`` and ``key`` strings), from keys and shapes alone."""
    import hashlib

    from diffsynth.core.loader.file import convert_keys_dict_to_single_str
    text = convert_keys_dict_to_single_str({k: list(v) for k, v in keys_and_shapes.items()})
    return hashlib.md5(text.encode('utf-8')).hexdigest()


def _arch_of(source, arch: Optional[Mapping]) -> dict:
    if arch is not None:
        return dict(arch)
    found = getattr(source, 'arch', None)
    if found is None:
        raise ValueError('export_generator: give arch=... (WanVACEScore.arch) when exporting a state dict '
                         '(config.json needs the architecture)')
    return dict(found)


def export_generator(source: Union[nn.Module, Mapping[str, torch.Tensor]],
                     out_dir: str,
                     *,
                     max_shard_size: Union[int, str] = '5GB',
                     ema: bool = False,
                     ema_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                     arch: Optional[Mapping] = None,
                     dtype=None,
                     sampler: Optional[Mapping] = None,
                     provenance: Optional[Mapping] = None,
                     overwrite: bool = False) -> Optional[ExportResult]:
    """Write the generator ``source`` to ``out_dir`` in the release layout (module doc).

    Args:
        source: the live generator (a ``WanVACEScore``; LoRA adapters are merged,
            ZeRO-3 partitions gathered shard by shard, which every rank must join:
            call this on all ranks, rank 0 writes), or a state dict in
            ``WanVACEScore`` (``dit.*``/``vace.*``) or release layout.
        out_dir: the export folder (created; an existing one is an error unless
            ``overwrite``, then replaced as a whole).
        max_shard_size: bytes per safetensors shard (``'5GB'``, ``'500MiB'`` or an int).
        ema: export the EMA weights: ``ema_state_dict`` (the EMA hook's tensors, by
            the module's own parameter names) replaces the live values.
        arch: the architecture (``WanVACEScore.arch``); taken from a module source.
        dtype: cast floating tensors (``'bf16'``, ``'fp32'``...); default: as stored.
        sampler: the student's few-step sampler for ``vdot_student.json``
            (default 4 steps [1000, 750, 500, 250], shift 5, fresh-noise re-noising).
        provenance: extra facts recorded in ``vdot_student.json`` (source files, iteration).

    Returns the :class:`ExportResult` on the main process, None on the others.
    Non-finite tensors are an error naming them (nothing is written).
    """
    max_bytes = parse_size(max_shard_size)
    dtype = as_dtype(dtype)
    if ema and ema_state_dict is None:
        raise ValueError('export_generator(ema=True): give ema_state_dict (the EMA hook\'s tensors, '
                         'or read them with vdot_ext.engine.ema.ema_generator_state_dict)')
    if not ema and ema_state_dict is not None:
        raise ValueError('export_generator: ema_state_dict given but ema=False; set ema=True to export it')
    config_arch = _arch_of(source, arch)
    if isinstance(source, nn.Module):
        entries = _module_entries(source, ema_state_dict if ema else None)
    elif isinstance(source, Mapping):
        state = dict(source)
        lora = [k for k in state if '.lora_' in k]
        if lora:
            raise ValueError(f'export_generator: the state dict holds LoRA tensors ({lora[:2]}); merge them first '
                             '(vdot_ext.models.lora.merge_lora_state_dict) or pass the live module')
        if ema:
            student_layout = all(k.startswith(('dit.', 'vace.')) for k in state)
            for key, value in ema_state_dict.items():
                name = key if student_layout else release_key(key)
                if name not in state:
                    raise KeyError(f'export_generator: EMA tensor {key!r} is not in the state dict')
                state[name] = value
        entries = _state_dict_entries(state)
    by_key = {}
    for entry in entries:
        if entry.key in by_key:
            raise ValueError(f'export_generator: two tensors map to the release key {entry.key!r}')
        by_key[entry.key] = entry
    order = sorted(by_key, key=_natural)
    out_dtype = {k: (dtype if dtype is not None and by_key[k].dtype.is_floating_point else by_key[k].dtype)
                 for k in order}
    sizes = [(k, _numel(by_key[k].shape) * torch.empty((), dtype=out_dtype[k]).element_size()) for k in order]
    plan = plan_shards(sizes, max_bytes)
    total_bytes = sum(n for _, n in sizes)
    config = release_config(config_arch)
    student = dict(format='vdot_ext student (Wan2.1 release layout)', sampler=dict(sampler or DEFAULT_SAMPLER),
                   ema=bool(ema), lora_merged=any(e.merged for e in entries),
                   dtype=(str(dtype) if dtype is not None else
                          ','.join(sorted({str(e.dtype) for e in entries}))).replace('torch.', ''),
                   diffsynth_hash=diffsynth_hash({k: by_key[k].shape for k in order}))
    student.update(dict(provenance or {}))

    main = is_main_process()
    out_dir = osp.abspath(out_dir)
    staging = f'{out_dir}.partial-{os.getpid()}'
    if main:
        if osp.exists(out_dir) and not overwrite:
            raise FileExistsError(f'export_generator: {out_dir} exists; choose another folder or pass '
                                  'overwrite=True (--overwrite)')
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    names, weight_map = [], {}
    try:
        for index, keys in enumerate(plan, start=1):
            name = SHARD_PATTERN.format(index=index, total=len(plan))
            needed = [p for k in keys for p in by_key[k].params]
            with _gathered(needed):
                tensors = {}
                for k in keys:
                    t = by_key[k].make()
                    if t.is_floating_point() and out_dtype[k] != t.dtype:
                        t = t.to(out_dtype[k])
                    tensors[k] = t.contiguous()
            if main:
                assert_finite_state_dict(tensors, f'export_generator shard {name}', 'generator weights')
                _save_shard(tensors, osp.join(staging, name))
            names.append(name)
            weight_map.update({k: name for k in keys})
            del tensors
        if main:
            write_json(osp.join(staging, INDEX_NAME),
                       {'metadata': {'total_size': total_bytes}, 'weight_map': weight_map})
            write_json(osp.join(staging, CONFIG_NAME), config)
            write_json(osp.join(staging, STUDENT_NAME), student)
            _replace_dir(staging, out_dir)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    if not main:
        return None
    return ExportResult(out_dir=out_dir, shards=[osp.join(out_dir, n) for n in names], num_tensors=len(order),
                        total_bytes=total_bytes, config=config, student=student,
                        diffsynth_hash=student['diffsynth_hash'])


def _save_shard(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """One safetensors shard (``{"format": "pt"}`` metadata, as Hugging Face writes), atomically."""
    from safetensors.torch import save
    payload = save(tensors, metadata={'format': 'pt'})
    with atomic_write(path) as f:
        f.write(payload)


def _replace_dir(staging: str, target: str) -> None:
    """Move a finished folder into place; an old one is moved aside first and
    deleted after, so ``target`` is always either the old or the new export."""
    old = None
    if osp.exists(target):
        old = f'{target}.old-{os.getpid()}'
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# diffsynth
# ---------------------------------------------------------------------------
def export_files(folder: str) -> List[str]:
    """The shard files of an export (from its index), in order."""
    index = osp.join(folder, INDEX_NAME)
    if not osp.isfile(index):
        raise FileNotFoundError(f'{folder}: no {INDEX_NAME} (not an export of vdot_ext.tools.export)')
    with open(index, encoding='utf-8') as f:
        weight_map = json.load(f)['weight_map']
    return [osp.join(folder, n) for n in sorted(set(weight_map.values()))]


def diffsynth_model_entries(folder: str) -> List[dict]:
    """diffsynth ``MODEL_CONFIGS`` entries describing an export (the same form as the
    official ones in ``diffsynth/configs/model_configs.py``): ``wan_video_dit`` and,
    for VACE, ``wan_video_vace``, both keyed by the files' hash."""
    arch = read_release_config(folder)
    if arch is None:
        raise FileNotFoundError(f'{folder}: no {CONFIG_NAME}')
    from diffsynth.core.loader.file import hash_model_file
    model_hash = hash_model_file(export_files(folder))
    dit = dict(has_image_input=False, patch_size=list(arch['patch_size']), in_dim=arch['in_dim'],
               dim=arch['dim'], ffn_dim=arch['ffn_dim'], freq_dim=arch['freq_dim'], text_dim=arch['text_dim'],
               out_dim=arch['out_dim'], num_heads=arch['num_heads'], num_layers=arch['num_layers'],
               eps=arch['eps'])
    entries = [dict(model_hash=model_hash, model_name='wan_video_dit',
                    model_class='diffsynth.models.wan_video_dit.WanModel', extra_kwargs=dit,
                    state_dict_converter='diffsynth.utils.state_dict_converters.wan_video_dit.'
                                         'WanVideoDiTStateDictConverter')]
    if arch['vace_layers']:
        vace = dict(vace_layers=tuple(arch['vace_layers']), vace_in_dim=arch['vace_in_dim'],
                    patch_size=tuple(arch['patch_size']), has_image_input=False, dim=arch['dim'],
                    num_heads=arch['num_heads'], ffn_dim=arch['ffn_dim'], eps=arch['eps'])
        entries.append(dict(model_hash=model_hash, model_name='wan_video_vace',
                            model_class='diffsynth.models.wan_video_vace.VaceWanModel', extra_kwargs=vace,
                            state_dict_converter='diffsynth.utils.state_dict_converters.wan_video_vace.'
                                                 'VaceWanModelDictConverter'))
    return entries


@contextlib.contextmanager
def register_with_diffsynth(folder: str) -> Iterator[List[dict]]:
    """Make diffsynth's ``ModelPool`` recognise an export whose sizes are not an
    official release's (diffsynth identifies a file by the hash of its keys and
    shapes): its entries are added to ``diffsynth.models.model_loader.MODEL_CONFIGS``
    for the duration of the block and removed after. Entries whose hash diffsynth
    already knows (real sizes) are not added; yields the added ones."""
    from diffsynth.models import model_loader
    known = {c['model_hash'] for c in model_loader.MODEL_CONFIGS}
    added = [e for e in diffsynth_model_entries(folder) if e['model_hash'] not in known]
    previous = model_loader.MODEL_CONFIGS
    model_loader.MODEL_CONFIGS = type(previous)(list(previous) + added)
    try:
        yield added
    finally:
        model_loader.MODEL_CONFIGS = previous
