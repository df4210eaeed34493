"""Small helpers shared by the distillation losses."""
from typing import Optional

import torch

from vdot_ext.utils import NonFiniteError


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension, kept broadcastable ([B, 1, ...])."""
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor,
                   reduction: str = 'mean') -> torch.Tensor:
    """``0.5 · reduce((x − sg(x − grad))²)``: a loss whose gradient w.r.t. x is
    ``grad`` (sum) or ``grad / numel`` (mean), computed in float32 (float64
    kept)."""
    x32 = x.double() if grad.dtype == torch.float64 else x.float()
    target = (x32 - grad.to(x32.dtype)).detach()
    sq = (x32 - target).square()
    if reduction == 'mean':
        return 0.5 * sq.mean()
    if reduction == 'sum':
        return 0.5 * sq.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def nonfinite_rows(tensor: torch.Tensor) -> list:
    """Batch rows (first dimension) of ``tensor`` that hold NaN/Inf; [0] for a
    non-finite scalar; [] when finite."""
    tensor = torch.as_tensor(tensor).detach()
    if not tensor.is_floating_point():
        return []
    if tensor.ndim == 0:
        return [] if bool(torch.isfinite(tensor)) else [0]
    bad = (~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(dim=1)
    return bad.nonzero().flatten().tolist()


def raise_nonfinite(owner: str, result: Optional[str] = None, **inputs) -> None:
    """Raise :class:`~vdot_ext.utils.NonFiniteError` naming the non-finite
    ``inputs`` and their batch rows (docs/DESIGN.md §11).

    Called by a loss once its result (``result``: what was non-finite, for the
    message) is known to be non-finite; when every input is finite the result
    overflowed, and the message says so."""
    bad = {name: rows for name, value in inputs.items() if value is not None
           for rows in [nonfinite_rows(value)] if rows}
    what = result or 'the result'
    if bad:
        listed = '; '.join(f'{name} in batch rows {rows}' for name, rows in bad.items())
        raise NonFiniteError(f'{owner}: {what} is not finite: NaN/Inf in {listed}')
    raise NonFiniteError(f'{owner}: {what} is not finite although its inputs '
                         f'({", ".join(n for n, v in inputs.items() if v is not None)}) are '
                         '(overflow)')
