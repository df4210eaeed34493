"""The one time/noise convention of vdot_ext (docs/DESIGN.md §4).

Rectified-flow parameterisation used by Wan2.1::

    t ∈ [0, 1000],  σ = t / 1000
    x_t = (1 − σ)·x0 + σ·ε          (add_noise)
    v   = ε − x0                     (velocity target)
    x0  = x_t − σ·v                  (x0_from_velocity)
    shift:  t' = 1000 · s·u / (1 + (s − 1)·u),  u = t / 1000

Every conversion runs in float32 (or float64 if given) whatever the dtype of the
network, and the results are cast back to the input dtype.
"""
from typing import Optional, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000.0


def _sigma(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """σ = t/1000 as float32 (float64 kept), broadcastable to an ``ndim`` tensor."""
    t = torch.as_tensor(t)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    sigma = t.to(dtype) / NUM_TRAIN_TIMESTEPS
    return sigma.reshape(sigma.shape + (1, ) * (ndim - sigma.ndim))


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def add_noise(x0: torch.Tensor, noise: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·ε, per-sample t of shape [B] (or scalar)."""
    sigma = _sigma(t.to(x0.device), x0.ndim)
    wide = _wide(x0)
    x_t = (1 - sigma) * x0.to(wide) + sigma * noise.to(wide)
    return x_t.to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0 (in float32, cast back)."""
    wide = _wide(x0)
    return (noise.to(wide) - x0.to(wide)).to(x0.dtype)


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t − σ·v."""
    sigma = _sigma(t.to(x_t.device), x_t.ndim)
    wide = _wide(x_t)
    return (x_t.to(wide) - sigma * v.to(wide)).to(x_t.dtype)


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """v = (x_t − x0)/σ (σ clamped away from 0)."""
    sigma = _sigma(t.to(x_t.device), x_t.ndim).clamp_min(1e-6)
    wide = _wide(x_t)
    return ((x_t.to(wide) - x0.to(wide)) / sigma).to(x_t.dtype)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = 1000 · s·u / (1 + (s − 1)·u), u = t/1000 (Wan's time shift)."""
    u = torch.as_tensor(t, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return (NUM_TRAIN_TIMESTEPS * shift * u / (1 + (shift - 1) * u)).to(
        torch.float32)


def sample_timesteps(batch_size: int,
                     shift: float = 5.0,
                     min_t: float = 20.0,
                     max_t: float = 980.0,
                     generator: Optional[torch.Generator] = None,
                     device=None) -> torch.Tensor:
    """Score timesteps: u ~ U[0,1), t = shift(1000·u), clamped to [min_t, max_t].

    docs/DESIGN.md §4: shift 5 for DMD/OTD/critic, shift 12 for the GAN.
    """
    u = torch.rand(batch_size, generator=generator)
    t = shift_timesteps(u * NUM_TRAIN_TIMESTEPS, shift).clamp(min_t, max_t)
    return t.to(device) if device is not None else t


def few_step_timesteps(steps: Sequence[float] = (1000, 750, 500, 250),
                       shift: float = 5.0) -> torch.Tensor:
    """The generator's denoising steps warped through the shift schedule.

    [1000, 750, 500, 250] with shift 5 -> [1000, 937.5, 833.3, 625].
    """
    return shift_timesteps(torch.tensor(steps, dtype=torch.float64), shift)
