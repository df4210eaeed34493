"""Samplers of the flow ODE dx/dσ = v (rectified flow, Wan2.1)."""
from typing import Optional

import torch

from .flow_matching import NUM_TRAIN_TIMESTEPS, shift_timesteps


@torch.no_grad()
def euler_sample(score,
                 noise: torch.Tensor,
                 context: torch.Tensor,
                 vace_context: Optional[torch.Tensor] = None,
                 num_steps: int = 40,
                 shift: float = 5.0,
                 guidance_scale: float = 1.0,
                 negative_context: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Many-step Euler sampler with classifier-free guidance (the teacher's).

    ``t_i = shift(1000·(1 − i/N))``, ``x ← x + (σ_{i+1} − σ_i)·v``, with
    ``v = v_u + w·(v_c − v_u)``; returns x at σ = 0.
    """
    if num_steps < 1:
        raise ValueError(f'euler_sample: num_steps must be >= 1, got {num_steps}')
    if guidance_scale != 1.0 and negative_context is None:
        negative_context = torch.zeros_like(context)
    grid = torch.linspace(NUM_TRAIN_TIMESTEPS, 0.0, num_steps + 1, dtype=torch.float64)
    ts = shift_timesteps(grid, shift).to(noise.device)
    x = noise.float()
    batch = x.shape[0]
    for i in range(num_steps):
        t = ts[i].expand(batch)
        v = score(x, t, context, vace_context).float()
        if guidance_scale != 1.0:
            v_u = score(x, t, negative_context, vace_context).float()
            v = v_u + guidance_scale * (v - v_u)
        x = x + (ts[i + 1] - ts[i]) / NUM_TRAIN_TIMESTEPS * v
    return x
