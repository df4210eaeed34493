"""Finiteness checks: nothing non-finite reaches the weights unnoticed."""
from typing import Dict, Iterable, List

import torch


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or Inf.

    Raised by losses on non-finite inputs (so the training step can skip the
    batch and name it, instead of a solver failing later) and by loaders on
    non-finite weights or caches (the message names the file)."""


def nonfinite_names(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors of ``tensors`` that hold NaN/Inf."""
    bad = []
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() \
                and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def assert_finite_state_dict(state: Dict[str, torch.Tensor], source: str, what: str = 'weights') -> None:
    """Raise :class:`NonFiniteError` naming ``source`` and the first bad keys."""
    bad = nonfinite_names(state)
    if bad:
        more = f' (+{len(bad) - 8} more)' if len(bad) > 8 else ''
        raise NonFiniteError(f'{source}: {what} contain NaN/Inf in {len(bad)} tensor(s): '
                             f'{bad[:8]}{more}')


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every tensor (None entries skipped) is finite."""
    for tensor in tensors:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return False
    return True
