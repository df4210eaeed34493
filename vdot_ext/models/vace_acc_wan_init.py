"""AccWanInit: the stage-2 generator = VACE weights + few-step Wan blocks.

VDOT paper, Algorithm 1 (inputs "pretrained VACE F_pretrain, pretrained
few-step Wan W_pretrain") and Table 3 ("AccWanInit refers to initializing the
Wan blocks in the VACE model using a few-step Wan model"): take a VACE-Wan2.1
model and overwrite its main Wan DiT (everything under ``dit.``: patch / text /
time embeddings, blocks, head) with the stage-1 few-step Wan T2V weights; the
VACE context blocks (``vace.``) keep their pretrained values.

Sources (docs/DESIGN.md §7, §8), told apart by what they are on disk:

==========================================  ==========================================
``source``                                  what is read
==========================================  ==========================================
the stage-1 run's ``export/`` folder        ``diffusion_pytorch_model-*.safetensors``
(``ExportGeneratorHook``), or a             (+ index) in the release key layout,
diffsynth / Wan2.1 release of a             through diffsynth's loader and converters
step-distilled Wan2.1-T2V (a folder, an     (``checkpoint_io``)
``.index.json``, shard files, a glob)
a training checkpoint file                  its ``state_dict`` under ``source_prefix``
(``iter_N.pth`` of the plain Runner, a      (``generator.dit.…``)
stage's ``final_model.pth``)
a DeepSpeed checkpoint folder of            the ``generator`` role's engine files:
``RoleDeepSpeedStrategy`` (``iter_N.pth/``  DeepSpeed's ZeRO-2/3 consolidation of the
with ``vdot_state.pth``)                    fp32 master weights
                                            (:func:`read_deepspeed_role_state_dict`)
a state dict                                as given
==========================================  ==========================================

Every source is loaded without unpickling code (docs/DESIGN.md §8) and must be
finite: NaN/Inf is a ``NonFiniteError`` naming the file. The report lists the
replaced, kept, missing and ignored (unexpected) keys; mis-shaped keys are an
error naming each key with both shapes.
"""
import contextlib
import glob
import io
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Union

import torch

from vdot_ext.models.checkpoint_io import (
    check_state_dict,
    convert_dit_state_dict,
    is_diffusers_layout,
    load_checkpoint_files,
    resolve_checkpoint_files,
)
from vdot_ext.models.weights import read_state_dict
from vdot_ext.registry import MODELS
from vdot_ext.utils import assert_finite_state_dict
from vdot_ext.utils.zero import deepspeed_safe_globals, load_deepspeed_file  # noqa: F401 (re-exported)

_SHOW = 5
# RoleDeepSpeedStrategy's checkpoint folder (vdot_ext/engine/deepspeed_checkpoint.py):
# <folder>/vdot_state.pth, one DeepSpeed engine folder per trainable role
DEEPSPEED_STATE_FILE = 'vdot_state.pth'
# the role-module container the strategy hands to deepspeed.initialize
_ROLE_CONTAINER_PREFIX = 'roles.'


# ---------------------------------------------------------------------------
# DeepSpeed checkpoint folders, read safely
# ---------------------------------------------------------------------------
def is_deepspeed_checkpoint(path) -> bool:
    """A ``RoleDeepSpeedStrategy`` checkpoint folder (``iter_N.pth/`` with ``vdot_state.pth``)."""
    return isinstance(path, (str, os.PathLike)) and osp.isdir(path) \
        and osp.isfile(osp.join(path, DEEPSPEED_STATE_FILE))


def _load_engine_file(path: str, field: str) -> dict:
    obj = load_deepspeed_file(path, field)
    if not isinstance(obj, dict):
        raise ValueError(f'{field}: {path} holds a {type(obj).__name__}, expected a DeepSpeed state dict')
    return obj


def read_deepspeed_role_state_dict(folder: str, role: str = 'generator',
                                   field: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The fp32 weights of one role of a ``RoleDeepSpeedStrategy`` checkpoint
    folder, keyed as in the model (``generator.dit.blocks.0…``).

    The role's engine files (``<folder>/<role>/*_model_states.pt`` and one
    ``*_optim_states.pt`` per rank) are consolidated by DeepSpeed's own
    ``zero_to_fp32`` code (ZeRO-2 and ZeRO-3; the fp32 master weights, as
    ``get_fp32_state_dict_from_zero_checkpoint`` returns them). That helper
    unpickles fully (code can run); here the files are read with
    ``weights_only=True`` (``safe_torch_load`` + :func:`deepspeed_safe_globals`)
    and handed to its consolidation functions. Parameters left out of the
    checkpoint (``exclude_frozen_parameters``: a LoRA run's base weights) are
    absent from the result.
    """
    from deepspeed.checkpoint.constants import (
        BUFFER_NAMES,
        DS_VERSION,
        FP32_FLAT_GROUPS,
        FROZEN_PARAM_FRAGMENTS,
        FROZEN_PARAM_SHAPES,
        OPTIMIZER_STATE_DICT,
        PARAM_ALIGNMENT_PADDINGS,
        PARAM_SHAPES,
        PARTITION_COUNT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
        ZERO_STAGE,
    )
    from deepspeed.utils import zero_to_fp32 as ds
    folder = os.fspath(folder)
    if not is_deepspeed_checkpoint(folder):
        raise FileNotFoundError(f'{field}: {folder!r} is not a DeepSpeed checkpoint folder of RoleDeepSpeedStrategy '
                                f'(no {DEEPSPEED_STATE_FILE})')
    role_dir = osp.join(folder, role)
    if not osp.isdir(role_dir):
        roles = sorted(d for d in os.listdir(folder) if osp.isdir(osp.join(folder, d)) and not d.startswith('.'))
        raise FileNotFoundError(f'{field}: {folder} has no engine folder for role {role!r} (found {roles})')
    model_files = sorted(glob.glob(osp.join(role_dir, '*_model_states.pt')), key=ds.natural_keys)
    optim_files = sorted(glob.glob(osp.join(role_dir, '*_optim_states.pt')), key=ds.natural_keys)
    if not model_files or not optim_files:
        raise FileNotFoundError(f'{field}: {role_dir} lacks DeepSpeed\'s *_model_states.pt / *_optim_states.pt '
                                f'(found {sorted(os.listdir(role_dir))})')
    model_states = []
    for path in model_files:   # ds.parse_model_states, loading safely
        state = _load_engine_file(path, field)
        if BUFFER_NAMES not in state or PARAM_SHAPES not in state:
            raise ValueError(f'{field}: {path} is not a DeepSpeed model-states file (no {BUFFER_NAMES!r})')
        buffers = {k: v.float() if v.is_floating_point() else v
                   for k, v in state['module'].items() if k in state[BUFFER_NAMES]}
        model_states.append(ds.zero_model_state(
            buffers=buffers, param_shapes=state[PARAM_SHAPES], shared_params=list(state['shared_params'].items()),
            ds_version=state.get(DS_VERSION), frozen_param_shapes=state.get(FROZEN_PARAM_SHAPES),
            frozen_param_fragments=state.get(FROZEN_PARAM_FRAGMENTS)))
    optim = []
    for path in optim_files:   # ds.parse_optim_states, loading safely
        state = _load_engine_file(path, field)
        if ZERO_STAGE not in (state.get(OPTIMIZER_STATE_DICT) or {}):
            raise ValueError(f'{field}: {path} is not a DeepSpeed ZeRO optimizer-states file')
        state[OPTIMIZER_STATE_DICT].pop('optimizer_state_dict', None)   # Adam moments: not needed
        optim.append(state[OPTIMIZER_STATE_DICT])
    stage = int(optim[0][ZERO_STAGE])
    world = optim[0][PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optim_files):
        raise ValueError(f'{field}: {role_dir} holds {len(optim_files)} *_optim_states.pt files but was saved by '
                         f'{world} ranks (an incomplete or overwritten checkpoint)')
    # DeepSpeed's consolidation prints progress (print, tqdm); keep it out of the user's output
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if stage <= 2:
            flat = [o[SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]
            merged = ds._get_fp32_state_dict_from_zero2_checkpoint(
                world, flat, model_states, True, optim[0].get(PARAM_ALIGNMENT_PADDINGS))
        elif stage == 3:
            flat = [o[FP32_FLAT_GROUPS] for o in optim]
            merged = ds._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, True)
        else:
            raise ValueError(f'{field}: {role_dir}: unknown ZeRO stage {stage}')
        state = ds.to_torch_tensor(merged)
    out = {}
    for key, value in state.items():
        if not key.startswith(_ROLE_CONTAINER_PREFIX):
            raise ValueError(f'{field}: {role_dir}: key {key!r} is not under the strategy\'s role container '
                             f'({_ROLE_CONTAINER_PREFIX!r})')
        out[key[len(_ROLE_CONTAINER_PREFIX):]] = value
    assert_finite_state_dict(out, f'{field}: {role_dir}', 'DeepSpeed role weights')
    return out


@dataclass
class AccWanInitReport:
    """replaced: ``dit.*`` keys overwritten from the source; kept: ``vace.*``
    keys left untouched; missing: ``dit.*`` keys the source lacked (only when
    strict=False); ignored: source keys not used (e.g. the source's own
    ``vace.*``); source: where the weights came from."""
    replaced: List[str]
    kept: List[str]
    source: str
    missing: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)


def _top_prefixes(keys) -> List[str]:
    return sorted({k.split('.', 1)[0] + '.' for k in keys})


@MODELS.register_module()
class VACEAccWanInit:
    """Replace a VACE ``WanVACEScore``'s main-DiT weights by a Wan T2V's.

    Args:
        source: a state dict; a path to a training checkpoint (``.pth``, ``.pt``,
            ``.ckpt``, ``.bin``); a ``RoleDeepSpeedStrategy`` checkpoint folder;
            or a release-layout Wan T2V (the stage-1 ``export/`` folder, a
            step-distilled release folder, its ``.index.json``, shard files or a
            glob; official or diffusers layout). See the module doc.
        source_prefix: prefix of the generator inside a state dict / training
            checkpoint / DeepSpeed folder (the distiller's ``generator.``),
            stripped before matching; '' for an un-prefixed state dict. Not
            used for release-layout sources.
        role: the DeepSpeed role whose engine holds the generator (a
            DeepSpeed folder only).
        strict: fail when the source lacks any Wan key of the target or
            carries Wan keys the target does not have.
    """

    _SAFETENSORS_HINTS = ('.safetensors', '.index.json')

    def __init__(self,
                 source: Union[str, os.PathLike, Sequence[str], Dict],
                 source_prefix: str = 'generator.',
                 role: str = 'generator',
                 strict: bool = True):
        self.source = source
        self.source_prefix = source_prefix or ''
        self.role = role
        self.strict = bool(strict)
        self._ignored: List[str] = []

    # -------------------------------------------------------------- sources
    def _describe(self) -> str:
        if isinstance(self.source, dict):
            return f'<state dict with {len(self.source)} keys>'
        if isinstance(self.source, (list, tuple)):
            return ', '.join(map(str, self.source))
        return os.fspath(self.source)

    def _is_release(self) -> bool:
        src = self.source
        if isinstance(src, (list, tuple)):
            return True
        path = os.fspath(src)
        return os.path.isdir(path) or path.endswith(self._SAFETENSORS_HINTS) \
            or any(c in os.path.basename(path) for c in '*?[')

    def _load_release(self) -> Dict[str, torch.Tensor]:
        """Release-layout files -> ``WanModel`` keys; keys that are not the Wan
        DiT's (e.g. the VACE blocks of a VACE export) are reported as ignored."""
        files = resolve_checkpoint_files(self.source, 'source')
        raw = load_checkpoint_files(files)
        dit = convert_dit_state_dict(raw)
        if not dit:
            raise ValueError(f'VACEAccWanInit: no Wan DiT weights in {files} (expected keys like '
                             f'"blocks.0.self_attn.q.weight"; found e.g. {sorted(raw)[:_SHOW]})')
        if not is_diffusers_layout(raw):
            self._ignored += [k for k in raw if k not in dit]
        return dit

    def _load_source(self) -> Dict[str, torch.Tensor]:
        """Source as ``{WanModel key: tensor}`` (plus 'ignored' bookkeeping)."""
        self._ignored = []
        desc = self._describe()
        if isinstance(self.source, dict):
            state = {k: v for k, v in self.source.items()
                     if isinstance(v, torch.Tensor)}
            assert_finite_state_dict(state, f'VACEAccWanInit.source {desc}')
        elif is_deepspeed_checkpoint(self.source):
            state = read_deepspeed_role_state_dict(self.source, self.role, field='VACEAccWanInit.source')
            lora = [k for k in state if '.lora_' in k]
            if lora:
                raise ValueError(
                    f'VACEAccWanInit: {desc} is the checkpoint of a LoRA run: its {self.role!r} engine holds only '
                    f'the adapters (e.g. {lora[:2]}), not the base weights. Give the run\'s export folder '
                    '(<work_dir>/export: base + merged adapters) instead')
        elif self._is_release():
            return self._load_release()
        else:  # safe load (weights_only=True), finiteness checked
            state = read_state_dict(os.fspath(self.source),
                                    field='VACEAccWanInit.source')
        prefix = self.source_prefix
        if prefix:
            picked = {k[len(prefix):]: v for k, v in state.items()
                      if k.startswith(prefix)}
            if not picked:
                raise ValueError(
                    f'VACEAccWanInit: no key of {desc} starts with '
                    f'source_prefix={prefix!r}; top-level prefixes found: '
                    f'{_top_prefixes(state)[:10]} (set source_prefix '
                    f'accordingly, \'\' for none)')
            self._ignored += [k for k in state if not k.startswith(prefix)]
            state = picked
        if any(k.startswith('dit.') for k in state):
            # a WanVACEScore state dict: its DiT lives under 'dit.'
            self._ignored += [prefix + k for k in state
                              if not k.startswith('dit.')]
            return {k[4:]: v for k, v in state.items() if k.startswith('dit.')}
        # raw WanModel / release key layout
        return convert_dit_state_dict(state)

    # ------------------------------------------------------------------ apply
    def __call__(self, vace_score) -> AccWanInitReport:
        from mmengine.logging import print_log
        if getattr(vace_score, 'vace', None) is None:
            raise ValueError(
                'VACEAccWanInit: the target has no VACE blocks; AccWanInit '
                'initialises a VACE model (build WanVACEScore with a '
                '*-vace preset or vace_layers)')
        src = self._load_source()
        desc = self._describe()
        target = vace_score.dit
        expected = target.state_dict()
        mismatched = [
            f'dit.{k}: target {tuple(expected[k].shape)} vs source '
            f'{tuple(src[k].shape)}' for k in expected
            if k in src and src[k].shape != expected[k].shape
        ]
        if mismatched:
            raise ValueError(
                f'VACEAccWanInit: shape mismatch between the VACE model\'s '
                f'Wan DiT and the source {desc} [{len(mismatched)}]: '
                f'{mismatched[:_SHOW]}')
        if self.strict:
            check_state_dict(target, src, desc,
                             'the Wan DiT (dit.*) of the VACE model')
        replaced = [k for k in expected if k in src]
        missing = [k for k in expected if k not in src]
        unexpected = [k for k in src if k not in expected]
        if not replaced:
            raise ValueError(
                f'VACEAccWanInit: the source {desc} has no Wan DiT key of the '
                f'target (e.g. {list(expected)[:3]}); found {list(src)[:5]}')
        with torch.no_grad():
            if any(t.is_meta for t in expected.values()):
                # a target built on 'meta': assign the source tensors
                target.load_state_dict(
                    {k: src[k].to(expected[k].dtype) for k in replaced},
                    strict=False, assign=True)
            else:
                for k in replaced:  # in place: same Parameters, dtype, device
                    expected[k].copy_(src[k])
        report = AccWanInitReport(
            replaced=['dit.' + k for k in replaced],
            kept=['vace.' + k for k in vace_score.vace.state_dict()],
            source=desc,
            missing=['dit.' + k for k in missing],
            ignored=self._ignored + unexpected)
        print_log(
            f'AccWanInit: replaced {len(report.replaced)} Wan DiT tensors '
            f'(e.g. {report.replaced[:3]}) from {desc}; kept '
            f'{len(report.kept)} VACE tensors; missing {len(report.missing)}'
            f'; ignored {len(report.ignored)} source tensors',
            logger='current')
        return report
