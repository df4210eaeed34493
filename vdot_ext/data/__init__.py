from .batch_samplers import ShapeGroupedBatchSampler  # noqa: F401
from .synthetic_videos import SyntheticVideoDataset, prepare_tiny_codecs  # noqa: F401
