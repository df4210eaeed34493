"""Every RNG stream a training step draws from, saved and restored together.

Exact resume (kill -9, rerun, identical weights) needs Python's ``random``,
numpy's global generator, torch's CPU generator and each CUDA device's
generator. Generators owned by a model are part of that model's state."""
import random

import numpy as np
import torch


def get_rng_state() -> dict:
    """A picklable snapshot of the global RNG streams (tensors and plain
    containers only, so it loads with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(
        python=dict(version=version, internal=torch.tensor(internal, dtype=torch.int64), gauss=gauss),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), cached=float(cached)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot of :func:`get_rng_state`."""
    py = state['python']
    random.setstate((py['version'], tuple(int(v) for v in py['internal'].tolist()), py['gauss']))
    nps = state['numpy']
    np.random.set_state((nps['kind'], nps['keys'].numpy().astype(np.uint32), nps['pos'], nps['has_gauss'],
                         nps['cached']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
