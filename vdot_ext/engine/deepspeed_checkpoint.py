"""Checkpoint folders of ``RoleDeepSpeedStrategy``: layout, crash-safe
publishing and safe loading (docs/DESIGN.md §8, §11).

Layout of one checkpoint folder::

    <ckpt>/<role>/...                  DeepSpeed engine checkpoint of each trainable role
    <ckpt>/lora_<module>/              LoRA adapters (peft layout, models/lora.py), LoRA roles only
    <ckpt>/<entry>.safetensors         tensor dicts of the checkpoint dict (the model's loose
                                       state, EMA weights, loss curves, ...): weights, not pickles
    <ckpt>/rng_state_rank<r>.pth       each rank's RNG streams (vdot_ext.utils.get_rng_state)
    <ckpt>/vdot_state.pth              the rest: meta, message hub, schedulers; written last

Crash safety: every rank writes into the hidden staging folder
``.<name>.tmp`` beside the target; after a barrier rank 0 flushes it to disk
and renames it to ``<name>`` (an existing ``<name>`` is first moved aside).
A folder named ``<name>`` therefore only ever exists complete, and holds
``vdot_state.pth``; a crash leaves at most a stale ``.<name>.tmp``, removed by
the next save of that name.

Safe loading: ``vdot_state.pth`` and the RNG files load with
``vdot_ext.utils.safe_torch_load`` (``weights_only=True``). DeepSpeed's own
engine files are read through :class:`SafeTorchCheckpointEngine`, which loads
them with ``weights_only=True`` and an allow-list of the four DeepSpeed classes
they hold (``LossScaler``, ``DynamicLossScaler``, ``ZeroStageEnum``,
``fragment_address``), instead of DeepSpeed's full unpickling.
"""
import functools
import os
import os.path as osp
import re
import shutil
from contextlib import contextmanager
from typing import Dict, List

import torch

from vdot_ext.utils import load_tensor_file, safe_torch_load, save_torch
from vdot_ext.utils.zero import deepspeed_safe_globals, load_deepspeed_file  # noqa: F401 (re-exported)

from .checkpointing import message_hub_to_plain, restore_plain_containers

CHECKPOINT_STATE = 'vdot_state.pth'
RNG_FILE = 'rng_state_rank{rank}.pth'
LORA_DIR = 'lora_{module}'
# vdot_state.pth lists the entries stored beside it as <entry>.safetensors
SAFETENSORS_ENTRIES = '__safetensors_entries__'
_ENTRY_NAME = re.compile(r'^[A-Za-z0-9_\-]+$')


# ----------------------------------------------------------------------
# DeepSpeed's engine files, loaded without unpickling code
# ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _safe_checkpoint_engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's ``TorchCheckpointEngine`` whose ``load`` never runs code
        from the file (``weights_only=True`` + :func:`deepspeed_safe_globals`)."""

        def load(self, path: str, map_location=None):
            return load_deepspeed_file(path, 'DeepSpeed engine checkpoint', map_location or 'cpu')

    return SafeTorchCheckpointEngine


def use_safe_checkpoint_engine(engine) -> None:
    """Replace ``engine``'s checkpoint engine by the safe one (same
    serialization settings). Only DeepSpeed's torch engine is replaced."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    current = getattr(engine, 'checkpoint_engine', None)
    if type(current) is not TorchCheckpointEngine:
        raise TypeError(f'RoleDeepSpeedStrategy: the DeepSpeed engine uses {type(current).__name__}; only '
                        'TorchCheckpointEngine can be made to load safely (remove the checkpoint engine '
                        'settings from the DeepSpeed config)')
    cls = _safe_checkpoint_engine_class()
    safe = cls.__new__(cls)   # __init__ would only log; the settings are copied
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


@contextmanager
def optimised_parameters_only(engine):
    """DeepSpeed leaves parameters out of its checkpoints by ``requires_grad``
    (``exclude_frozen_parameters``); the model switches ``requires_grad`` per
    step, so inside this block it marks exactly what the engine optimises
    (``_vdot_trainable``, set when the engine is built)."""
    params = list(engine.module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(bool(getattr(p, '_vdot_trainable', True)))
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------
# staging and publishing a folder
# ----------------------------------------------------------------------
def staging_folder(final: str) -> str:
    final = osp.normpath(os.fspath(final))
    return osp.join(osp.dirname(final), f'.{osp.basename(final)}.tmp')


def remove_path(path: str) -> None:
    if osp.isdir(path) and not osp.islink(path):
        shutil.rmtree(path)
    elif osp.lexists(path):
        os.remove(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(staging: str, final: str) -> None:
    """Flush ``staging`` to disk and rename it to ``final`` (rank 0 only)."""
    for root, _, names in os.walk(staging):
        for name in names:
            _fsync(osp.join(root, name))
    if osp.lexists(final):
        if not osp.isdir(final):
            raise FileExistsError(f'RoleDeepSpeedStrategy: {final} exists and is not a checkpoint folder')
        aside = osp.join(osp.dirname(final), f'.{osp.basename(final)}.old.tmp')
        remove_path(aside)
        os.replace(final, aside)
        os.replace(staging, final)
        shutil.rmtree(aside)
    else:
        os.replace(staging, final)
    _fsync(osp.dirname(osp.abspath(final)))


# ----------------------------------------------------------------------
# vdot_state.pth and its safetensors entries
# ----------------------------------------------------------------------
def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def write_checkpoint_state(folder: str, checkpoint: dict) -> List[str]:
    """Write the strategy's checkpoint dict into ``folder`` (rank 0): its
    top-level tensor dicts as ``<entry>.safetensors``, the message hub in
    plain containers, the rest to ``vdot_state.pth`` (last). Returns the
    safetensors entries."""
    from vdot_ext.utils import save_safetensors
    checkpoint = dict(checkpoint)
    if isinstance(checkpoint.get('message_hub'), dict):
        checkpoint['message_hub'] = message_hub_to_plain(checkpoint['message_hub'])
    entries = []
    for key in list(checkpoint):
        if _ENTRY_NAME.match(key) and key != 'meta' and _is_tensor_dict(checkpoint[key]):
            save_safetensors(checkpoint.pop(key), osp.join(folder, f'{key}.safetensors'))
            entries.append(key)
    checkpoint[SAFETENSORS_ENTRIES] = entries
    save_torch(checkpoint, osp.join(folder, CHECKPOINT_STATE))
    return entries


def read_checkpoint_state(folder: str) -> dict:
    """The checkpoint dict :func:`write_checkpoint_state` wrote (safetensors
    entries put back, message hub ready for ``MessageHub.load_state_dict``).
    Loads nothing that can run code; errors name the file."""
    path = osp.join(folder, CHECKPOINT_STATE)
    if not osp.isfile(path):
        raise FileNotFoundError(f'RoleDeepSpeedStrategy: {folder!r} is not a checkpoint of this strategy '
                                f'(no {CHECKPOINT_STATE}; a checkpoint is a folder with {CHECKPOINT_STATE} '
                                'and one folder per role)')
    state = safe_torch_load(path, field='RoleDeepSpeedStrategy checkpoint state')
    if not isinstance(state, dict):
        raise ValueError(f'{path}: holds a {type(state).__name__}, expected the checkpoint dict')
    for key in state.pop(SAFETENSORS_ENTRIES, []):
        state[key] = load_tensor_file(osp.join(folder, f'{key}.safetensors'),
                                      field=f'RoleDeepSpeedStrategy checkpoint entry {key!r}')
    return restore_plain_containers(state)


def save_rng_state(folder: str, rank: int) -> None:
    from vdot_ext.utils import get_rng_state
    save_torch(get_rng_state(), osp.join(folder, RNG_FILE.format(rank=rank)))


def load_rng_state(folder: str, rank: int) -> Dict:
    path = osp.join(folder, RNG_FILE.format(rank=rank))
    state = safe_torch_load(path, field='RoleDeepSpeedStrategy RNG state')
    if not isinstance(state, dict) or 'torch' not in state:
        raise ValueError(f'{path}: not an RNG state of vdot_ext.utils.get_rng_state')
    return state
