"""Loading a module's weights from a local safetensors/torch/mmengine checkpoint, safely."""
import os
import os.path as osp
from typing import Dict, Sequence

import torch
import torch.nn as nn
from mmengine.logging import print_log

from vdot_ext.utils import assert_finite_state_dict, load_tensor_file

from .checkpoint_io import check_state_dict


def read_state_dict(checkpoint: str, field: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The tensors of a local checkpoint: safetensors, an mmengine checkpoint
    (``state_dict`` entry), a DeepSpeed-style ``module``/``model`` entry, or a
    plain state dict. Non-tensor entries are dropped.

    Torch files load with ``weights_only=True`` and the allow-list of
    ``vdot_ext.utils.safe_torch_load``: a file that would run code is refused
    (docs/DESIGN.md §8). NaN/Inf in any tensor is a ``NonFiniteError`` naming
    the file.
    """
    if not isinstance(checkpoint, (str, os.PathLike)) or not osp.isfile(checkpoint):
        raise FileNotFoundError(f'{field}: checkpoint file {checkpoint!r} does not exist')
    checkpoint = os.fspath(checkpoint)
    state = load_tensor_file(checkpoint, field=field)
    if not state:
        raise ValueError(f'{field}: {checkpoint} holds no tensors')
    assert_finite_state_dict(state, f'{field}: {checkpoint}')
    return state


def load_weights(module: nn.Module,
                 checkpoint: str,
                 prefix: str = '',
                 ignore: Sequence[str] = (),
                 field: str = 'checkpoint',
                 strict: bool = True) -> None:
    """Load ``checkpoint`` keys starting with ``prefix`` (stripped) into ``module``.

    Keys starting with any of ``ignore`` (after stripping) are skipped, e.g.
    ``ignore=['vace.']`` loads the DiT of a VACE checkpoint into a T2V model.
    Missing, unexpected or mis-shaped keys are an error naming the file,
    unless ``strict=False``.
    """
    state = read_state_dict(checkpoint, field)
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    picked = {k: v for k, v in picked.items() if not k.startswith(tuple(ignore))}
    if not picked:
        raise ValueError(f'{field}: no keys with prefix {prefix!r} in {checkpoint} '
                         f'(first keys: {list(state)[:5]})')
    if strict:
        check_state_dict(module, picked, checkpoint,
                         f'{type(module).__name__} ({field}, prefix {prefix!r})')
    module.load_state_dict(picked, strict=strict)
    print_log(f'loaded {len(picked)} tensors into {type(module).__name__} from '
              f'{checkpoint} (prefix {prefix!r})', logger='current')
