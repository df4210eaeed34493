"""The VCU data path on diffsynth (docs/DESIGN.md §3, §10): manifests, readers,
task builders, codecs, the encoded-sample cache and the training dataset.

Importing it registers ``VCUManifestDataset`` in ``DATASETS``; nothing of
diffsynth is patched on import (see :mod:`.host_patch`).
"""
from . import vcu_dataset  # noqa: F401  (registers VCUManifestDataset in DATASETS)
from .manifest import ManifestRow, parse_manifest, summarize_errors
from .vcu import encode_vcu
from .vcu_cache import NonFiniteSampleError, VCUCache
from .vcu_codecs import UMT5PromptEncoder, VCUCodecs
from .vcu_dataset import VCUManifestDataset
from .video_reader import VCUInputError

__all__ = ['ManifestRow', 'parse_manifest', 'summarize_errors', 'encode_vcu', 'NonFiniteSampleError',
           'VCUCache', 'UMT5PromptEncoder', 'VCUCodecs', 'VCUManifestDataset', 'VCUInputError']
