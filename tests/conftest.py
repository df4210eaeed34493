"""Test-session settings.

Tiny models spend their time in per-op overhead, which a second intra-op
thread only adds to (and on a loaded 2-core machine it multiplies); tests run
torch single-threaded. Subprocess tests (mim train) use torch's default.
"""
import torch

torch.set_num_threads(1)


from torch.utils.data import Dataset  # noqa: E402

from vdot_ext.registry import DATASETS  # noqa: E402


@DATASETS.register_module(name='RandomLatentsForTest', force=True)
class RandomLatentsForTest(Dataset):
    """Fixed random tensors shaped like a VCU sample (3 latent frames of 8x8),
    for the staged-recipe and train-CLI tests."""

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.items = [dict(context=torch.randn(6, 32, generator=g),
                           latents=torch.randn(16, 3, 8, 8, generator=g),
                           vace_context=torch.randn(96, 3, 8, 8, generator=g))
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
