"""Explicit, version-checked fixes for host libraries, applied by function call."""
import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader

_TRUSTED_LOADING = False


def _load_local_trusted(filename, map_location):
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    # mmengine checkpoints pickle the message hub and config next to the
    # tensors; torch >= 2.6 rejects them with weights_only=True. These are the
    # user's own local training checkpoints.
    return torch.load(filename, map_location=map_location, weights_only=False)


def enable_trusted_local_checkpoints() -> None:
    """Let mmengine 0.10.x resume from its own local checkpoints on torch >= 2.6.

    mmengine's local loader calls ``torch.load`` without ``weights_only``;
    torch 2.6 changed that default to True. This replaces mmengine's
    local-file scheme with one that passes ``weights_only=False``. Called by
    ``vdot_ext/tools/train.py``; idempotent.
    """
    global _TRUSTED_LOADING
    if _TRUSTED_LOADING:
        return
    torch_major_minor = tuple(int(v) for v in torch.__version__.split('.')[:2])
    if torch_major_minor >= (2, 6):
        CheckpointLoader.register_scheme(prefixes='', force=True)(_load_local_trusted)
    _TRUSTED_LOADING = True
