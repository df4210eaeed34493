"""AccWanInit: the stage-2 generator = VACE weights + few-step Wan blocks.

VDOT paper, Algorithm 1 (inputs "pretrained VACE F_pretrain, pretrained
few-step Wan W_pretrain") and Table 3 ("AccWanInit refers to initializing the
Wan blocks in the VACE model using a few-step Wan model"): take a VACE-Wan2.1
model and overwrite its main Wan DiT (everything under ``dit.``: patch / text /
time embeddings, blocks, head) with the stage-1 few-step Wan T2V weights; the
VACE context blocks (``vace.``) keep their pretrained values.

Sources: a state dict; an mmengine checkpoint of the stage-1 run (``.pth``
with ``state_dict`` keys like ``generator.dit.blocks.0.self_attn.q.weight``);
or local safetensors of a few-step Wan T2V release (read with diffsynth's
loader and converters through ``checkpoint_io``). Every source is loaded
without unpickling code (docs/DESIGN.md §8) and must be finite: NaN/Inf is a
``NonFiniteError`` naming the file.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Union

import torch

from vdot_ext.models.checkpoint_io import (check_state_dict,
                                           convert_dit_state_dict,
                                           load_wan_vace_state_dict)
from vdot_ext.models.weights import read_state_dict
from vdot_ext.registry import MODELS
from vdot_ext.utils import assert_finite_state_dict

_SHOW = 5


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
        source: a state dict, a path to an mmengine/torch checkpoint (``.pth``,
            ``.pt``, ``.ckpt``, ``.bin``), or safetensors file(s)/directory of
            a Wan T2V model (official or diffusers layout).
        source_prefix: prefix of the generator inside a state dict / mmengine
            checkpoint (the distiller's ``generator.``), stripped before
            matching; '' for an un-prefixed state dict. Not used for
            safetensors releases.
        strict: fail when the source lacks any Wan key of the target or
            carries Wan keys the target does not have.
    """

    _SAFETENSORS_HINTS = ('.safetensors', '.index.json')

    def __init__(self,
                 source: Union[str, os.PathLike, Sequence[str], Dict],
                 source_prefix: str = 'generator.',
                 strict: bool = True):
        self.source = source
        self.source_prefix = source_prefix or ''
        self.strict = bool(strict)

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

    def _load_source(self) -> Dict[str, torch.Tensor]:
        """Source as ``{WanModel key: tensor}`` (plus 'ignored' bookkeeping)."""
        self._ignored: List[str] = []
        if not isinstance(self.source, dict) and self._is_release():
            parts = load_wan_vace_state_dict(self.source, has_vace=False,
                                             field='source')
            return parts.dit
        if isinstance(self.source, dict):
            state = {k: v for k, v in self.source.items()
                     if isinstance(v, torch.Tensor)}
            assert_finite_state_dict(state, f'VACEAccWanInit.source '
                                     f'{self._describe()}')
        else:  # safe load (weights_only=True), finiteness checked
            state = read_state_dict(os.fspath(self.source),
                                    field='VACEAccWanInit.source')
        prefix = self.source_prefix
        if prefix:
            picked = {k[len(prefix):]: v for k, v in state.items()
                      if k.startswith(prefix)}
            if not picked:
                raise ValueError(
                    f'VACEAccWanInit: no key of {self._describe()} starts with '
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
