"""The encoded-sample cache of :class:`~.vcu_dataset.VCUManifestDataset`.

Layout (docs/DESIGN.md §8)::

    <cache_dir>/<pixel_hash>_<codec_hash>/config.json
    <cache_dir>/<pixel_hash>_<codec_hash>/<sample_key>.safetensors

* ``pixel_hash`` = ``stable_hash(pixel_config)[:16]``: everything that changes the
  pixels F/M/refs/video of a configuration, among them ``data_version`` (the
  readers) and ``condition_version`` (:data:`vdot_ext.patches.tasks.CONDITION_VERSION`,
  the condition builders). A cache made before a condition changed has another
  key and is refused, with the command that rebuilds it.
* ``codec_hash`` = ``stable_hash(codec identity)[:8]``: VAE and text encoder
  types, options and checkpoint fingerprints.
* ``sample_key`` = ``stable_hash(row.key_dict())[:24]``: the manifest row (id,
  relative paths and sizes, every VCU field).

Files are written atomically (temporary file, fsync, rename;
:func:`vdot_ext.utils.save_safetensors`, :func:`vdot_ext.utils.write_json`) and
read with :func:`vdot_ext.utils.load_tensor_file`. Every read is checked: the
stored hashes and condition version, the tensor names and shapes, and finite
values (NaN/Inf → :class:`NonFiniteSampleError`, a
:class:`~vdot_ext.utils.NonFiniteError` naming the file). Every error names
the file.
"""
import json
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from vdot_ext.utils import NonFiniteError, load_tensor_file, save_safetensors, stable_hash, write_json

from .video_reader import VCUInputError

logger = logging.getLogger(__name__)

CACHE_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
REQUIRED_TENSORS = ('context', 'latents', 'vace_context')
REBUILD_TOOL = 'python -m vdot_ext.tools.precompute_vcu'


class NonFiniteSampleError(VCUInputError, NonFiniteError):
    """A sample's encoded tensors (read from the cache or just encoded) hold
    NaN/Inf. A :class:`VCUInputError` (so ``on_error='skip'`` skips the sample)
    and a :class:`~vdot_ext.utils.NonFiniteError`; the message names the file."""


def jsonable(obj):
    """``obj`` as it reads back from JSON (tuples → lists, non-JSON → str)."""
    return json.loads(json.dumps(obj, default=str))


def pixel_hash(pixel_config: dict) -> str:
    return stable_hash(jsonable(pixel_config))[:16]


def sample_key(key_dict: dict) -> str:
    return stable_hash(key_dict)[:24]


def first_nonfinite(tensors: Dict[str, torch.Tensor]) -> Optional[Tuple[str, int]]:
    """``(name, count)`` of the first tensor with NaN/Inf, or None.

    One reduction per tensor instead of a clip-sized bool mask (≈10× faster on
    64 MiB samples): any NaN/Inf makes the sum non-finite; only then the exact
    count (0 when the sum merely overflowed)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return name, bad
    return None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f'cache config {path}: unreadable ({type(exc).__name__}: {exc}); delete '
                         'its folder to rebuild the cache') from None
    if not isinstance(data, dict):
        raise ValueError(f'cache config {path}: expected a JSON object; delete its folder to rebuild')
    return data


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def config_differences(stored: dict, current: dict) -> List[str]:
    """``'key: stored → current'`` for every key whose value differs."""
    return [f'{k}: {_short(stored.get(k))} → {_short(current.get(k))}'
            for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]


class VCUCache:
    """One cache folder of one pixel configuration and one set of codecs.

    Args:
        cache_dir: the cache root (holds one folder per configuration).
        pixel_config: the dataset's pixel configuration (JSON-able dict).
        codec_identity: ``VCUCodecs.identity``; None = read-only use: the
            folder of this pixel configuration must exist (one codec set).
        manifest: for messages (the rebuild command).
    """

    def __init__(self, cache_dir: str, pixel_config: dict, codec_identity: Optional[dict] = None,
                 manifest: Optional[str] = None):
        self.cache_dir = os.path.abspath(cache_dir)
        self.pixel_config = jsonable(pixel_config)
        self.pixel_hash = pixel_hash(self.pixel_config)
        self.codec_identity = None if codec_identity is None else jsonable(codec_identity)
        self.manifest = manifest
        self.folder = self._resolve()
        self._config_written = False

    # ------------------------------------------------------------ folder
    @property
    def config_path(self) -> str:
        return os.path.join(self.folder, 'config.json')

    def rebuild_hint(self) -> str:
        return (f'Run `{REBUILD_TOOL} {self.manifest or "MANIFEST"} --cache-dir {self.cache_dir} '
                '...` with the same dataset settings (or give the dataset codec=... to encode on '
                'the fly)')

    def _resolve(self) -> str:
        if self.codec_identity is not None:
            folder = os.path.join(self.cache_dir,
                                  f'{self.pixel_hash}_{stable_hash(self.codec_identity)[:8]}')
            self._check_config(folder)
            stale = self._stale_condition_caches()
            if stale and not os.path.isdir(folder):
                logger.warning(f'VCU cache: {"; ".join(stale)}. Not used: samples are encoded anew '
                               f'into {folder}; delete the old folders to free their space.')
            return folder
        candidates = []
        if os.path.isdir(self.cache_dir):
            candidates = sorted(d for d in os.listdir(self.cache_dir)
                                if d.startswith(self.pixel_hash + '_')
                                and os.path.isfile(os.path.join(self.cache_dir, d, 'config.json')))
        if len(candidates) == 1:
            folder = os.path.join(self.cache_dir, candidates[0])
            stored = self._check_config(folder)
            logger.info(f'VCU cache: using {folder} (codecs: {json.dumps(stored.get("codec"))})')
            return folder
        if len(candidates) > 1:
            raise ValueError(f'VCU cache: {self.cache_dir} holds caches of this pixel configuration '
                             f'for several codecs ({candidates}); set codec=... to pick one')
        raise ValueError(f'VCU cache: no cache for this configuration in {self.cache_dir} and no '
                         f'codec configured. {self._describe_others()}{self.rebuild_hint()}.')

    def _other_configs(self):
        """``(folder name, stored pixel_config or an error text)`` of the other caches."""
        if not os.path.isdir(self.cache_dir):
            return []
        out = []
        for name in sorted(os.listdir(self.cache_dir)):
            path = os.path.join(self.cache_dir, name, 'config.json')
            if name.startswith(self.pixel_hash + '_') or not os.path.isfile(path):
                continue
            try:
                out.append((name, _read_json(path).get('pixel_config', {})))
            except ValueError as exc:
                out.append((name, str(exc)))
        return out

    def _describe_others(self) -> str:
        notes = []
        for name, stored in self._other_configs():
            if isinstance(stored, str):
                notes.append(f'{name}: {stored}')
                continue
            notes.append(f'{name} differs in {config_differences(stored, self.pixel_config)}')
            if stored.get('condition_version') != self.pixel_config.get('condition_version'):
                notes[-1] += (f' (built for VCU conditions version {stored.get("condition_version")}, '
                              f'this code builds version {self.pixel_config.get("condition_version")}: '
                              'the conditions changed since, rebuild it)')
        return f'Caches there were built for other settings: {"; ".join(notes)}. ' if notes else ''

    def _stale_condition_caches(self) -> List[str]:
        """Caches that differ from this configuration only in the condition version."""
        mine = {k: v for k, v in self.pixel_config.items() if k != 'condition_version'}
        stale = []
        for name, stored in self._other_configs():
            if isinstance(stored, dict) and stored.get('condition_version') != \
                    self.pixel_config.get('condition_version') and \
                    {k: v for k, v in stored.items() if k != 'condition_version'} == mine:
                stale.append(f'{name} was built for VCU conditions version '
                             f'{stored.get("condition_version")} (now '
                             f'{self.pixel_config.get("condition_version")})')
        return stale

    def _check_config(self, folder: str) -> dict:
        path = os.path.join(folder, 'config.json')
        if not os.path.isfile(path):
            return {}
        stored = _read_json(path)
        if stored.get('pixel_config') != self.pixel_config:
            diff = config_differences(stored.get('pixel_config') or {}, self.pixel_config)
            raise ValueError(f'{path}: stored pixel configuration differs from this dataset\'s in '
                             f'{diff} (corrupt or hand-edited cache); delete the folder to rebuild')
        return stored

    def write_config(self) -> None:
        """``config.json`` of the folder (once; atomic)."""
        if self._config_written or os.path.isfile(self.config_path):
            self._config_written = True
            return
        write_json(self.config_path, dict(pixel_config=self.pixel_config, codec=self.codec_identity,
                                          manifest=self.manifest,
                                          created=time.strftime('%Y-%m-%d %H:%M:%S')), indent=1)
        self._config_written = True

    # ------------------------------------------------------------ files
    def path(self, key: str) -> str:
        return os.path.join(self.folder, f'{key}.safetensors')

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def _stored_meta(self, path: str, sample: Optional[str]) -> dict:
        from safetensors import safe_open  # the header only (safetensors never runs code)
        try:
            with safe_open(path, framework='pt') as handle:
                return json.loads((handle.metadata() or {}).get('vcu', '{}'))
        except Exception as exc:  # a torn or foreign file: any reader error means unreadable
            raise VCUInputError(f'unreadable cache file ({type(exc).__name__}: {exc}); delete it '
                                'to rebuild', sample, 'cache', path) from None

    def load(self, key: str, expected_shapes: Dict[str, tuple], sample: Optional[str] = None
             ) -> Optional[Dict[str, torch.Tensor]]:
        """The float32 tensors of sample ``key``, or None when it is not cached.

        Raises :class:`VCUInputError` (wrong hashes, missing tensors, wrong shapes,
        unreadable file) or :class:`NonFiniteSampleError` (NaN/Inf), naming the file."""
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        meta = self._stored_meta(path, sample)
        version = self.pixel_config.get('condition_version')
        if meta.get('condition_version') != version:
            raise VCUInputError(f'cache file was written for VCU conditions version '
                                f'{meta.get("condition_version")}, this code builds version '
                                f'{version}; delete {self.folder} and rebuild the cache. '
                                f'{self.rebuild_hint()}', sample, 'cache', path)
        if meta.get('pixel_hash') != self.pixel_hash or meta.get('sample_key') != key:
            raise VCUInputError(f'cache file was written for another configuration or sample '
                                f'(stored {meta.get("pixel_hash")}/{meta.get("sample_key")}, '
                                f'expected {self.pixel_hash}/{key}); delete it to rebuild',
                                sample, 'cache', path)
        try:
            tensors = load_tensor_file(path, field='cache')
        except Exception as exc:
            raise VCUInputError(f'unreadable cache file ({type(exc).__name__}: {exc}); delete it '
                                'to rebuild', sample, 'cache', path) from None
        for name in REQUIRED_TENSORS:
            if name not in tensors:
                raise VCUInputError(f'cache file lacks tensor {name!r}', sample, name, path)
        for name, shape in expected_shapes.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise VCUInputError(f'cached {name} has shape {tuple(tensors[name].shape)}, '
                                    f'expected {tuple(shape)}', sample, name, path)
        bad = first_nonfinite(tensors)
        if bad:
            raise NonFiniteSampleError(f'cached tensor {bad[0]!r} has {bad[1]} NaN/Inf values; '
                                       'delete the file to re-encode it', sample, bad[0], path)
        return {k: v.float() for k, v in tensors.items()}

    def save(self, key: str, tensors: Dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
             meta: Optional[dict] = None, sample: Optional[str] = None) -> str:
        """Write sample ``key`` atomically (a crash leaves the old file or none,
        never a torn one). Non-finite tensors are refused, not cached."""
        path = self.path(key)
        bad = first_nonfinite(tensors)
        if bad:
            raise NonFiniteSampleError(f'encoder produced {bad[1]} NaN/Inf values in {bad[0]!r}; '
                                       'not caching', sample, bad[0], path)
        self.write_config()
        stored = dict(meta or {}, pixel_hash=self.pixel_hash, sample_key=key,
                      condition_version=self.pixel_config.get('condition_version'))
        save_safetensors({k: v.detach().to(dtype) for k, v in tensors.items()}, path,
                         metadata=dict(vcu=json.dumps(stored, default=str)))
        return path
