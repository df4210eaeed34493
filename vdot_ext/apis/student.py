"""Loading a trained student (the generator G_θ) from any of the files a run leaves
(docs/DESIGN.md §7, §8).

Sources, told apart by what they are on disk:

=====================================  ==================================================
``ckpt``                               what is read
=====================================  ==================================================
an export folder                       ``config.json`` (architecture) and the
(``vdot_ext.tools.export``) or a       ``*.safetensors`` shards, through diffsynth's
Wan-AI / VACE release folder           loader and state-dict converters (``checkpoint_io``)
``*.safetensors`` file(s), index       release layout (diffsynth converters) or our
                                       ``dit.*``/``vace.*`` layout
a training checkpoint ``.pth``         the plain Runner's ``iter_N.pth`` or a stage's
                                       ``final_model.pth``: ``state_dict`` keys under
                                       ``prefix`` (``generator.``); with ``ema=True`` the
                                       EMA weights (``ema_state_dict``)
``ema_generator.safetensors``          the EMA hook's end-of-training file (needs ``base``)
a DeepSpeed checkpoint folder          the ``generator`` engine's fp32 weights,
(``iter_N.pth/`` with                  consolidated by DeepSpeed's ZeRO-2/3 code from
``vdot_state.pth``)                    files read safely; with ``ema=True`` the
                                       folder's ``ema_state_dict``
=====================================  ==================================================

A LoRA file (``lora``) is merged into those weights, ``W' = W + (α/r)·B·A``
(docs/DESIGN.md §7, Eq. 22); a training checkpoint of a LoRA run (``base_layer``
and ``lora_A``/``lora_B`` keys) is merged the same way.

The architecture comes from, in order: the folder's ``config.json``, ``config``
(an mmengine config: ``model.generator`` or ``model.real_score``), ``preset``,
or the one preset of :data:`~vdot_ext.models.wan_vace_score.PRESETS` whose keys
and shapes the weights match exactly. Files are read without unpickling code
and checked finite (docs/DESIGN.md §8, §11); every error names the file and the
option it came from.
"""
import json
import logging
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from vdot_ext.utils import assert_finite_state_dict, load_tensor_file, safe_torch_load

from .export import DEFAULT_SAMPLER, as_dtype, read_release_config, read_student_info, release_key, student_key

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
TORCH_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin')
_LORA_PREFIXES = ('base_model.model.', 'diffusion_model.', 'model.diffusion_model.', 'transformer.')


@dataclass
class LoadedStudent:
    """The student module and what was read to build it."""
    model: torch.nn.Module
    arch: dict
    sources: List[str]
    sampler: dict
    arch_from: str
    ema: bool = False
    lora: Optional[str] = None
    notes: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------
def _preset_shapes(preset: str) -> Dict[str, Tuple[int, ...]]:
    from vdot_ext.models.wan_vace_score import WanVACEScore
    model = WanVACEScore(preset, device='meta')
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_preset(shapes: Dict[str, Tuple[int, ...]], source: str) -> str:
    """The preset whose keys and shapes equal ``shapes`` (``WanVACEScore`` layout)."""
    from vdot_ext.models.wan_vace_score import PRESETS
    dim = shapes.get('dit.patch_embedding.weight', (None, ))[0]
    for name, arch in PRESETS.items():
        if arch['dim'] != dim:      # cheap filter before building on 'meta'
            continue
        if _preset_shapes(name) == shapes:
            return name
    raise ValueError(f'{source}: the weights match no preset of WanVACEScore ({sorted(PRESETS)}; '
                     f'patch embedding width {dim}); give the architecture with --config CONFIG or '
                     '--preset NAME')


def arch_from_config(config: PathLike, field_name: str = '--config') -> dict:
    """The generator's ``WanVACEScore`` arguments from an mmengine config
    (``model.generator``, else ``model.real_score``)."""
    from mmengine.config import Config
    if not osp.isfile(config):
        raise FileNotFoundError(f'{field_name}: config file {config!r} does not exist')
    cfg = Config.fromfile(config)
    model = cfg.get('model') or {}
    score = model.get('generator') or model.get('real_score')
    if not score:
        raise ValueError(f'{field_name}: {config} has no model.generator or model.real_score')
    keep = ('preset', 'dim', 'ffn_dim', 'num_heads', 'num_layers', 'text_dim', 'freq_dim', 'in_dim',
            'out_dim', 'patch_size', 'eps', 'vace_layers', 'vace_in_dim')
    arch = {k: score[k] for k in keep if score.get(k) is not None}
    if not arch:
        raise ValueError(f'{field_name}: model.generator/real_score of {config} sets no architecture')
    if isinstance(arch.get('preset'), str) and arch['preset'].startswith('???'):
        raise ValueError(f'{field_name}: {config} leaves the preset unset ({arch["preset"]!r})')
    return arch


# ---------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------
def _lora_key(key: str) -> str:
    """A LoRA tensor name in the student's layout (``dit.…``/``vace.…``)."""
    for prefix in _LORA_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith('generator.'):
        key = key[len('generator.'):]
    return key if key.startswith(('dit.', 'vace.')) else student_key(key)


def read_lora_file(path: PathLike, alpha: Optional[float] = None, field_name: str = '--lora'
                   ) -> Tuple[Dict[str, torch.Tensor], float]:
    """(LoRA tensors in the student's layout, scale α/r) from a LoRA file.

    Accepted: our ``lora_<role>.pth`` (``state_dict`` + ``lora_config``), a
    ``.safetensors`` with peft's keys (``…lora_A.weight``, with or without an
    adapter name) and a ``lora_config`` JSON in its metadata or an
    ``adapter_config.json`` beside it, or a peft adapter folder
    (``adapter_model.safetensors`` + ``adapter_config.json``). ``alpha`` (α)
    overrides the file's; without either, it is an error.
    """
    from vdot_ext.models.lora import is_lora_key
    path = os.fspath(path)
    config: Optional[dict] = None
    if osp.isdir(path):
        folder, weights = path, osp.join(path, 'adapter_model.safetensors')
        if not osp.isfile(weights):
            raise FileNotFoundError(f'{field_name}: folder {path} has no adapter_model.safetensors '
                                    '(a peft adapter folder)')
        path = weights
    else:
        folder = osp.dirname(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{field_name}: LoRA file {path!r} does not exist')
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        tensors = load_tensor_file(path, field=field_name)
        with safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
        if meta.get('lora_config'):
            config = json.loads(meta['lora_config'])
    else:
        obj = safe_torch_load(path, field=field_name)
        if not isinstance(obj, dict):
            raise ValueError(f'{field_name}: {path} holds a {type(obj).__name__}, expected a dict')
        config = obj.get('lora_config')
        tensors = obj.get('state_dict', obj)
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if config is None and osp.isfile(osp.join(folder, 'adapter_config.json')):
        with open(osp.join(folder, 'adapter_config.json'), encoding='utf-8') as f:
            config = json.load(f)
    lora = {_lora_key(k): v for k, v in tensors.items() if is_lora_key(k)}
    if not lora:
        raise ValueError(f'{field_name}: {path} holds no LoRA tensors (keys with ".lora_A."/".lora_B."; '
                         f'found e.g. {sorted(tensors)[:3]})')
    assert_finite_state_dict(lora, f'{field_name} {path}', 'LoRA weights')
    ranks = {int(v.shape[0]) for k, v in lora.items() if '.lora_A.' in k}
    rank = (config or {}).get('rank', (config or {}).get('r'))
    rank = int(rank) if rank is not None else (ranks.pop() if len(ranks) == 1 else None)
    if alpha is None and config is not None:
        alpha = config.get('alpha', config.get('lora_alpha'))
    if rank is None or alpha is None:
        raise ValueError(f'{field_name}: {path} does not record the LoRA {"rank" if rank is None else "alpha"}; '
                         'give --lora_alpha (α; the scale is α/r)')
    return lora, float(alpha) / float(rank)


def _merge_lora(state: Dict[str, torch.Tensor], lora: Dict[str, torch.Tensor], scale: float,
                source: str) -> Dict[str, torch.Tensor]:
    from vdot_ext.models.lora import merge_lora_state_dict
    return merge_lora_state_dict(state, lora, scale, source=source)


# ---------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------
def _is_release_folder(path: str) -> bool:
    return osp.isdir(path) and any(n.endswith('.safetensors') for n in os.listdir(path))


def _read_training_checkpoint(path: str, prefix: str, ema: bool, base: Optional[str],
                              field_name: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The generator's tensors (``WanVACEScore`` layout) of a training checkpoint."""
    notes = []
    if ema:
        from vdot_ext.engine.ema import ema_generator_state_dict
        state = ema_generator_state_dict(path, base=base, module=prefix.rstrip('.') or None)
        notes.append(f'EMA weights of {path}')
        return state, notes
    obj = safe_torch_load(path, field=field_name)
    if not isinstance(obj, dict):
        raise ValueError(f'{field_name}: {path} holds a {type(obj).__name__}, expected a checkpoint dict')
    for container in ('state_dict', 'module', 'model'):
        if isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not picked and all(k.startswith(('dit.', 'vace.')) for k in tensors) and tensors:
        picked = tensors  # a bare WanVACEScore state dict
    if not picked:
        raise ValueError(f'{field_name}: no keys under prefix {prefix!r} in {path} (e.g. {sorted(tensors)[:3]}); '
                         'set --ckpt_prefix')
    return picked, notes


def _read_safetensors(paths: Sequence[str], field_name: str) -> Dict[str, torch.Tensor]:
    """Our-layout safetensors (``dit.*``/``vace.*``), or None-able release files."""
    state: Dict[str, torch.Tensor] = {}
    for path in paths:
        part = load_tensor_file(path, field=field_name)
        overlap = set(part) & set(state)
        if overlap:
            raise ValueError(f'{field_name}: key {sorted(overlap)[0]!r} appears twice ({path})')
        state.update(part)
    return state


def _release_state(files: Sequence[str], has_vace: bool, field_name: str) -> Dict[str, torch.Tensor]:
    """Release-layout files → ``WanVACEScore`` layout through diffsynth's converters."""
    from vdot_ext.models.checkpoint_io import load_wan_vace_state_dict
    parts = load_wan_vace_state_dict(list(files), has_vace=has_vace, field=field_name)
    state = {f'dit.{k}': v for k, v in parts.dit.items()}
    if parts.vace is not None:
        state.update({f'vace.{k}': v for k, v in parts.vace.items()})
    return state


def _read_deepspeed_folder(folder: str, prefix: str, ema: bool, base: Optional[str], role: str,
                           field_name: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The generator of a ``RoleDeepSpeedStrategy`` checkpoint folder: the
    ``role`` engine's fp32 weights (DeepSpeed's ZeRO-2/3 consolidation, read
    safely), or with ``ema`` the folder's ``ema_state_dict``."""
    if ema:
        return _read_training_checkpoint(folder, prefix, True, base, field_name)
    from vdot_ext.models.vace_acc_wan_init import read_deepspeed_role_state_dict
    tensors = read_deepspeed_role_state_dict(folder, role, field=field_name)
    picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(f'{field_name}: the {role!r} engine of {folder} holds no keys under prefix {prefix!r} '
                         f'(e.g. {sorted(tensors)[:3]}); set --ckpt_prefix')
    if any('.lora_' in k for k in picked) and not any('.base_layer.' in k for k in picked):
        raise ValueError(f'{field_name}: {folder} is the checkpoint of a LoRA run: its {role!r} engine holds only '
                         f'the adapters. Give the run\'s export folder (<work_dir>/export), or the base weights '
                         f'with --ckpt and the adapters with --lora {osp.join(folder, "lora_generator")}')
    return picked, [f'{role!r} engine of the DeepSpeed checkpoint {folder} (fp32 master weights)']


def read_student_weights(ckpt: Union[PathLike, Sequence[PathLike]], *, prefix: str = 'generator.',
                         ema: bool = False, base: Optional[str] = None, role: str = 'generator',
                         field_name: str = '--ckpt'
                         ) -> Tuple[Dict[str, torch.Tensor], Optional[dict], List[str], List[str]]:
    """(state dict in ``WanVACEScore`` layout, architecture from a config.json or
    None, files read, notes). ``role``: the DeepSpeed engine holding the student
    when ``ckpt`` is a ``RoleDeepSpeedStrategy`` checkpoint folder."""
    from vdot_ext.models.checkpoint_io import resolve_checkpoint_files
    from vdot_ext.models.vace_acc_wan_init import is_deepspeed_checkpoint
    paths = [os.fspath(p) for p in ([ckpt] if isinstance(ckpt, (str, os.PathLike)) else ckpt)]
    if not paths:
        raise ValueError(f'{field_name}: no checkpoint given')
    notes: List[str] = []
    if len(paths) == 1 and osp.isdir(paths[0]):
        folder = paths[0]
        if is_deepspeed_checkpoint(folder):
            state, more = _read_deepspeed_folder(folder, prefix, ema, base, role, field_name)
            return state, None, [folder], notes + more
        if not _is_release_folder(folder):
            raise FileNotFoundError(f'{field_name}: folder {folder} holds no *.safetensors (expected an export '
                                    'of vdot_ext.tools.export or a Wan2.1 / VACE release folder)')
        if ema:
            raise ValueError(f'{field_name}: --ema applies to training checkpoints; {folder} is an export '
                             '(its vdot_student.json says whether it holds EMA weights)')
        arch = read_release_config(folder)
        files = resolve_checkpoint_files(folder, field_name)
        has_vace = arch['vace_layers'] != () if arch is not None else _files_have_vace(files)
        return _release_state(files, has_vace, field_name), arch, files, notes
    if len(paths) == 1 and paths[0].endswith(TORCH_SUFFIXES):
        state, more = _read_training_checkpoint(paths[0], prefix, ema, base, field_name)
        return state, None, paths, notes + more
    files = resolve_checkpoint_files(paths, field_name)
    if ema:
        if len(files) != 1:
            raise ValueError(f'{field_name}: --ema reads one EMA file, got {files}')
        state, more = _read_training_checkpoint(files[0], prefix, True, base, field_name)
        return state, None, files, notes + more
    state = _read_safetensors(files, field_name)
    if all(k.startswith(('dit.', 'vace.')) for k in state):
        return state, None, files, notes
    return _release_state(files, _files_have_vace(files), field_name), None, files, notes


def _files_have_vace(files: Sequence[str]) -> bool:
    from safetensors import safe_open
    for path in files:
        if path.endswith('.safetensors'):
            with safe_open(path, framework='pt') as f:
                if any(k.startswith('vace_') for k in f.keys()):
                    return True
    return False


def load_student(ckpt: Union[PathLike, Sequence[PathLike]], *,
                 lora: Optional[PathLike] = None,
                 lora_alpha: Optional[float] = None,
                 config: Optional[PathLike] = None,
                 preset: Optional[str] = None,
                 prefix: str = 'generator.',
                 ema: bool = False,
                 ema_base: Optional[str] = None,
                 dtype=None,
                 device: Union[str, torch.device] = 'cpu') -> LoadedStudent:
    """Build the student ``WanVACEScore`` from ``ckpt`` (module doc), merged with
    ``lora`` if given, cast to ``dtype`` and moved to ``device``, in eval mode."""
    from vdot_ext.models.checkpoint_io import load_state_dict_checked
    from vdot_ext.models.wan_vace_score import WanVACEScore
    dtype = as_dtype(dtype, '--dtype')
    state, arch, files, notes = read_student_weights(ckpt, prefix=prefix, ema=ema, base=ema_base)
    source = ', '.join(files)
    lora_file = None
    adapters = {k: v for k, v in state.items() if '.lora_' in k}
    if adapters:  # a LoRA run's own checkpoint: base_layer + adapters
        if lora_alpha is None and config is not None:
            lora_alpha = _config_lora_alpha(config)
        ranks = {int(v.shape[0]) for k, v in adapters.items() if '.lora_A.' in k}
        if lora_alpha is None:
            raise ValueError(f'--ckpt: {source} holds LoRA adapters but not their α; give --lora_alpha '
                             '(or --config with model.generator_lora)')
        state = _merge_lora(state, adapters, float(lora_alpha) / ranks.pop(), source)
        notes.append(f'merged the LoRA adapters of {source} (α={lora_alpha})')
    if lora is not None:
        lora_tensors, scale = read_lora_file(lora, lora_alpha)
        state = _merge_lora(state, lora_tensors, scale, source)
        lora_file = os.fspath(lora)
        notes.append(f'merged LoRA {lora_file} (scale {scale:g})')
    assert_finite_state_dict(state, source, 'student weights')

    if arch is not None:
        arch_from = 'config.json'
        build = dict(arch)
    elif config is not None:
        build, arch_from = arch_from_config(config), f'--config {config}'
    elif preset is not None:
        build, arch_from = dict(preset=preset), f'--preset {preset}'
    else:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        name = match_preset(shapes, source)
        build, arch_from = dict(preset=name), f'preset {name!r} (matched by shapes)'
    model = WanVACEScore(**build, device='meta')
    load_state_dict_checked(model, state, files, f'the student ({arch_from})')
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    model.eval().requires_grad_(False)
    # the few-step sampler: an export's own record, else the training config's, else 4 steps, shift 5
    sampler = dict(DEFAULT_SAMPLER)
    folder = os.fspath(ckpt) if isinstance(ckpt, (str, os.PathLike)) else None
    recorded = read_student_info(folder).get('sampler') if folder and osp.isdir(folder) else None
    if recorded:
        sampler.update(recorded)
    elif config is not None:
        sampler.update(_config_sampler(config))
    logger.info(f'student: {type(model).__name__}({model.extra_repr()}) from {source} [{arch_from}]')
    return LoadedStudent(model=model, arch=dict(model.arch), sources=list(files), sampler=sampler,
                         arch_from=arch_from, ema=ema, lora=lora_file, notes=notes)


def _config_model(config: PathLike) -> dict:
    from mmengine.config import Config
    return Config.fromfile(config).get('model') or {}


def _config_lora_alpha(config: PathLike) -> Optional[float]:
    lora = _config_model(config).get('generator_lora')
    if not lora:
        return None
    return float(lora.get('alpha') if lora.get('alpha') is not None else lora.get('rank', 32))


def _config_sampler(config: PathLike) -> dict:
    model = _config_model(config)
    out = {}
    if model.get('generator_timesteps') is not None:
        out['timesteps'] = [float(t) for t in model['generator_timesteps']]
    if model.get('generator_shift') is not None:
        out['shift'] = float(model['generator_shift'])
    return out


__all__ = ['LoadedStudent', 'load_student', 'read_student_weights', 'read_lora_file', 'match_preset',
           'arch_from_config', 'release_key']
