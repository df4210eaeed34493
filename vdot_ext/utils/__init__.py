"""The bottom layer of vdot_ext: file I/O, finiteness checks, RNG state,
hashing, dict merging and process-rank helpers.

Nothing here imports from ``vdot_ext.models``, ``vdot_ext.engine`` or
``vdot_ext.patches``; every other layer may import from here
(docs/DESIGN.md §2, dependency direction).
"""
from .dicts import merge_dicts
from .dist import barrier, is_main_process, unwrap_model
from .finite import NonFiniteError, assert_finite_state_dict, nonfinite_names
from .hashing import stable_hash
from .io import (
                 TRUST_PICKLE_ENV,
                 UnsafeCheckpointError,
                 atomic_write,
                 load_tensor_file,
                 safe_torch_load,
                 save_safetensors,
                 save_torch,
                 write_json,
)
from .rng import get_rng_state, set_rng_state

__all__ = [
    'merge_dicts', 'barrier', 'is_main_process', 'unwrap_model', 'NonFiniteError',
    'assert_finite_state_dict', 'nonfinite_names', 'stable_hash', 'TRUST_PICKLE_ENV',
    'UnsafeCheckpointError', 'atomic_write', 'load_tensor_file', 'safe_torch_load',
    'save_safetensors', 'save_torch', 'write_json', 'get_rng_state', 'set_rng_state'
]
