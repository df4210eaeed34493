"""Test-session settings.

Tiny models spend their time in per-op overhead, which a second intra-op
thread only adds to (and on a loaded 2-core machine it multiplies); tests run
torch single-threaded. Subprocess tests (mim train) use torch's default.
"""
import torch

torch.set_num_threads(1)
