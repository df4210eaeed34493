"""Small helpers shared by the distillation losses."""
import torch


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
