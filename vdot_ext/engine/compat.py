"""Explicit, version-checked fixes for host libraries, applied by function call."""
import os.path as osp

from mmengine.runner.checkpoint import CheckpointLoader

from vdot_ext.utils import UnsafeCheckpointError, safe_torch_load

_SAFE_LOADER_INSTALLED = False
# what mmengine's plain CheckpointHook pickles into a checkpoint
_HISTORY_BUFFER = 'HistoryBuffer'


def load_local_checkpoint(filename: str, map_location=None):
    """mmengine's local-file checkpoint loader, rebuilt on ``safe_torch_load``.

    Loads with ``weights_only=True`` and our explicit allow-list
    (docs/DESIGN.md §8), so a ``--resume`` or ``load_from`` never runs code
    from the file; the message hub, which ``VDOTCheckpointHook`` stores in
    plain tensors, is turned back into ``HistoryBuffer`` objects.
    """
    from .checkpointing import restore_plain_containers
    filename = osp.expanduser(filename)
    try:
        checkpoint = safe_torch_load(filename, map_location=map_location, field='checkpoint')
    except UnsafeCheckpointError as exc:
        if _HISTORY_BUFFER in str(exc):
            raise UnsafeCheckpointError(
                f'{exc} It looks like a checkpoint written by mmengine\'s plain CheckpointHook, which '
                'pickles the message hub; vdot_ext configs save with VDOTCheckpointHook '
                "(default_hooks.checkpoint.type='VDOTCheckpointHook').") from exc
        raise
    return restore_plain_containers(checkpoint)


def install_safe_checkpoint_loader() -> None:
    """Make mmengine load local checkpoints (``resume``, ``load_from``) with
    :func:`load_local_checkpoint`. Process-wide and idempotent.

    mmengine 0.10.x's own local loader calls ``torch.load`` without
    ``weights_only``: with torch >= 2.6 (default ``True``) it rejects
    mmengine's own checkpoints, and with full unpickling it would run any code
    a crafted file carries. The one opt-in for trusted legacy files is
    ``VDOT_EXT_TRUST_PICKLE=1``. Called by ``vdot_ext/tools/train.py`` and by
    ``VDOTCheckpointHook.before_run``.
    """
    global _SAFE_LOADER_INSTALLED
    if _SAFE_LOADER_INSTALLED:
        return
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
    _SAFE_LOADER_INSTALLED = True


def enable_trusted_local_checkpoints() -> None:
    """Deprecated name of :func:`install_safe_checkpoint_loader` (which, despite
    this name, trusts nothing)."""
    install_safe_checkpoint_loader()
