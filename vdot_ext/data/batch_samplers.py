"""Batch samplers."""
from collections import defaultdict
from typing import Iterator, List

from torch.utils.data import Sampler

from vdot_ext.registry import DATA_SAMPLERS


@DATA_SAMPLERS.register_module()
class ShapeGroupedBatchSampler(Sampler):
    """Batches of samples whose tensors have the same shape.

    VCU samples differ in length: reference-to-video prepends one latent frame
    per reference image. This sampler buckets the indices drawn from
    ``sampler`` by ``dataset.shape_key(index)`` and yields a bucket when it
    holds ``batch_size`` indices, so batches collate without padding.

    Bad samples (``VCUManifestDataset(on_error='skip')``, docs/DESIGN.md §11):
    rows dropped at parsing never reach this sampler (they are not in the
    dataset). A sample found bad when read is replaced by the dataset with a
    good sample of the same group, or, when its whole group is bad, with one
    of a single fallback group that is the same for every index of the dead
    group. Each batch yielded here holds one group, so its items keep one
    shape either way and the batch still collates.

    Args:
        sampler: the index sampler (e.g. mmengine's ``InfiniteSampler``); its
            ``dataset`` must define ``shape_key(index) -> hashable``.
        batch_size: samples per batch.
        drop_last: accepted for mmengine's builder; incomplete buckets are
            never yielded while the (infinite) sampler runs.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = True):
        dataset = getattr(sampler, 'dataset', None)
        if dataset is None or not hasattr(dataset, 'shape_key'):
            raise TypeError('ShapeGroupedBatchSampler needs a sampler with a .dataset '
                            'that defines shape_key(index); got '
                            f'{type(sampler).__name__} over {type(dataset).__name__}')
        if batch_size < 1:
            raise ValueError(f'ShapeGroupedBatchSampler.batch_size must be >= 1, got {batch_size}')
        self.sampler = sampler
        self.dataset = dataset
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[List[int]]:
        buckets = defaultdict(list)
        for index in self.sampler:
            bucket = buckets[self.dataset.shape_key(index)]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield list(bucket)
                bucket.clear()

    def __len__(self) -> int:
        return max(len(self.sampler) // self.batch_size, 1)
