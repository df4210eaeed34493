"""Writing files so that a crash never leaves a half-written one, and reading
them so that a load never runs code.

* Every write goes to a temporary file in the target's directory, is flushed
  to disk, then renamed over the target (``os.replace`` is atomic on POSIX):
  a reader sees the old file or the new one, never a torn one.
* ``torch.load`` always runs with ``weights_only=True``. Our own checkpoints
  need a few non-tensor types (numpy arrays, dtypes and scalars); they are
  allow-listed explicitly (:func:`_safe_globals`). mmengine's message hub is
  stored in plain containers by our checkpoint hook, so no class of
  mmengine's needs unpickling. Anything
  else is refused with :class:`UnsafeCheckpointError`, naming the file and the
  offending globals. The one escape for trusted legacy files is opt-in:
  ``VDOT_EXT_TRUST_PICKLE=1`` in the environment, or ``trust_pickle=True``
  from code (docs/DESIGN.md §8).
* Weights we write (not optimizer state) are safetensors.
"""
import contextlib
import json
import os
import os.path as osp
import tempfile
import warnings
from typing import Dict, Optional

import torch

TRUST_PICKLE_ENV = 'VDOT_EXT_TRUST_PICKLE'


class UnsafeCheckpointError(RuntimeError):
    """A file would need arbitrary unpickling (code execution) to load."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb'):
    """Open a temporary file beside ``path``; on success fsync and rename it to
    ``path``, on error delete it (``path`` is left as it was)."""
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def write_json(path: str, obj, **kwargs) -> None:
    """JSON through :func:`atomic_write` (indent 2, non-JSON values by str)."""
    kwargs.setdefault('indent', 2)
    kwargs.setdefault('default', str)
    with atomic_write(path, 'w') as f:
        json.dump(obj, f, **kwargs)


def save_safetensors(state: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """A flat tensor dict as safetensors, atomically. Shared-storage tensors
    are written as contiguous copies (safetensors refuses aliasing)."""
    from safetensors.torch import save
    shared = _shared_ptrs(state)
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        tensors[key] = value.clone() if value.numel() and value.data_ptr() in shared else value
    payload = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    with atomic_write(path) as f:
        f.write(payload)


def _shared_ptrs(state: Dict[str, torch.Tensor]) -> set:
    seen, shared = set(), set()
    for tensor in state.values():
        if tensor.numel() == 0:
            continue
        ptr = tensor.data_ptr()
        (shared if ptr in seen else seen).add(ptr)
    return shared


def _safe_globals() -> list:
    """The non-tensor types our own checkpoints contain, and nothing else."""
    import numpy as np
    allowed = [np.ndarray, np.dtype]
    core = getattr(np, '_core', None) or np.core
    allowed += [core.multiarray._reconstruct, core.multiarray.scalar]
    # numpy >= 1.25 pickles dtypes by their concrete DType classes
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith('DType')]
    return allowed


def safe_torch_load(path: str, *, map_location='cpu', field: str = 'checkpoint',
                    trust_pickle: Optional[bool] = None):
    """``torch.load`` that never runs code from the file.

    Loads with ``weights_only=True`` and the allow-list of :func:`_safe_globals`.
    A file that needs anything else raises :class:`UnsafeCheckpointError`
    naming ``field``, the file and the offending globals. ``trust_pickle``
    (default: the ``VDOT_EXT_TRUST_PICKLE`` environment variable) loads a
    trusted legacy file with full unpickling, with a warning.
    """
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{field}: file {path!r} does not exist')
    if trust_pickle is None:
        trust_pickle = os.environ.get(TRUST_PICKLE_ENV, '') not in ('', '0', 'false', 'False')
    if trust_pickle:
        warnings.warn(f'{field}: loading {path} with full unpickling ({TRUST_PICKLE_ENV} / '
                      'trust_pickle=True): only do this for files you trust', stacklevel=2)
        return torch.load(path, map_location=map_location, weights_only=False)  # documented opt-in
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, or RuntimeError for corrupt zips
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f'{field}: refusing to load {path}: it needs arbitrary unpickling of '
                f'{unsafe[:8]}, which can run code. If you trust this file, set '
                f'{TRUST_PICKLE_ENV}=1 (or re-save it as safetensors).') from exc
        # a torn or corrupt file: name it (the original error is chained)
        raise RuntimeError(f'{field}: cannot load {path}: {type(exc).__name__}: {exc}') from exc


def _unsafe_globals(path: str) -> list:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []
    allowed = {f'{getattr(g, "__module__", "")}.{getattr(g, "__qualname__", getattr(g, "__name__", ""))}'
               for g in _safe_globals()}
    return [g for g in found if g not in allowed]


def load_tensor_file(path: str, field: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or a (safely loaded) torch file.

    A torch file may be a plain state dict or a container with a
    ``state_dict`` / ``module`` / ``model`` entry (mmengine, DeepSpeed)."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{field}: file {path!r} does not exist')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as exc:
            raise ValueError(f'{field}: cannot read safetensors file {path}: {exc}') from exc
    obj = safe_torch_load(path, field=field)
    if not isinstance(obj, dict):
        raise ValueError(f'{field}: {path} holds a {type(obj).__name__}, expected a state dict '
                         'or a checkpoint dict')
    for container in ('state_dict', 'module', 'model'):
        if isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
