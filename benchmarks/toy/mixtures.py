"""Isotropic Gaussian mixtures with an exact teacher x0-predictor under the flow-matching noise of vdot_ext.

Noise convention (docs/DESIGN.md §4; ``vdot_ext.models.flow_matching``): σ = t/1000, x_t = (1 − σ)·x0 + σ·ε,
ε ~ N(0, I). Data p(x0) = Σ_k π_k N(μ_k, s_k² I) in d dimensions.

Derivation of the teacher. Given the component k, x0 and x_t are jointly Gaussian:

    x_t | k ~ N(m_k, v_k I),   m_k = (1 − σ) μ_k,   v_k = (1 − σ)² s_k² + σ²
    Cov(x0, x_t | k) = (1 − σ) s_k² I

so by Gaussian conditioning

    E[x0 | x_t, k] = μ_k + (1 − σ) s_k² / v_k · (x_t − m_k)

and, with the posterior responsibilities r_k(x_t) = π_k N(x_t; m_k, v_k I) / Σ_j π_j N(x_t; m_j, v_j I),

    E[x0 | x_t] = Σ_k r_k(x_t) · [μ_k + (1 − σ) s_k² / v_k · (x_t − m_k)]                      (teacher x0)

Check (Tweedie for this convention): E[x0 | x_t] = (x_t + σ² ∇ log p_t(x_t)) / (1 − σ), with
∇ log p_t = −Σ_k r_k (x_t − m_k)/v_k; both give Σ_k r_k [(1 − σ) s_k²/v_k · x_t + σ² μ_k / v_k]. At σ = 1 the
teacher returns the mixture mean Σ_k π_k μ_k. ``tests/test_toy_benchmark.py`` checks the formula against a
Monte-Carlo posterior mean and against Tweedie with an autograd score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from scipy.stats import chi2

__all__ = ['Mixture', 'MIXTURES', 'make_mixture', 'mode_metrics', 'w2_exact']


@dataclass
class Mixture:
    """p(x0) = Σ_k π_k N(μ_k, s_k² I): ``means`` [K, d], ``stds`` [K], ``weights`` [K] (float64)."""
    name: str
    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n samples [n, d] (float32)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * eps).float()

    def _posterior(self, x_t: torch.Tensor, sigma: torch.Tensor):
        """Responsibilities r [.., K], per-component gain (1 − σ)s_k²/v_k [.., K] and centres m_k [.., K, d]."""
        x = x_t.double()
        sigma = sigma.double()
        keep = (1.0 - sigma)[..., None]                                      # [.., 1]
        var = keep.square() * self.stds.square() + sigma[..., None].square()  # v_k [.., K]
        centres = keep[..., None] * self.means                               # m_k [.., K, d]
        sq = (x[..., None, :] - centres).square().sum(-1)                    # ‖x_t − m_k‖² [.., K]
        log_joint = (self.weights.log() - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var)
        resp = torch.softmax(log_joint, dim=-1)
        gain = keep * self.stds.square() / var
        return resp, gain, centres, var

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] (formula in the module docstring). ``x_t`` [..., d]; ``t`` broadcastable to x_t[..., 0]
        (timesteps in [0, 1000]). Computed in float64, returned in x_t's dtype."""
        sigma = torch.as_tensor(t, dtype=torch.float64) / 1000.0
        sigma = sigma.expand(x_t.shape[:-1]) if sigma.ndim <= x_t.ndim - 1 else sigma
        resp, gain, centres, _ = self._posterior(x_t, sigma)
        per_mode = self.means + gain[..., None] * (x_t.double()[..., None, :] - centres)   # [.., K, d]
        return (resp[..., None] * per_mode).sum(-2).to(x_t.dtype)

    def log_prob_t(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x_t) of the noised mixture (for the Tweedie check)."""
        sigma = (torch.as_tensor(t, dtype=x_t.dtype) / 1000.0).expand(x_t.shape[:-1])
        keep = (1.0 - sigma)[..., None]
        var = keep.square() * self.stds.to(x_t.dtype).square() + sigma[..., None].square()
        centres = keep[..., None] * self.means.to(x_t.dtype)
        sq = (x_t[..., None, :] - centres).square().sum(-1)
        log_joint = (self.weights.to(x_t.dtype).log() - 0.5 * self.dim * torch.log(2 * math.pi * var)
                     - 0.5 * sq / var)
        return torch.logsumexp(log_joint, dim=-1)


def _ring(num_modes: int = 8, radius: float = 1.4, std: float = 0.1) -> Mixture:
    angle = torch.arange(num_modes, dtype=torch.float64) * 2 * math.pi / num_modes
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return Mixture('ring8', means, torch.full((num_modes, ), std, dtype=torch.float64),
                   torch.full((num_modes, ), 1.0 / num_modes, dtype=torch.float64))


def _unbalanced() -> Mixture:
    # three modes on a circle of radius 1.4, weights 0.7 / 0.2 / 0.1
    angle = torch.tensor([math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3],
                         dtype=torch.float64)
    means = 1.4 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return Mixture('unbalanced3', means, torch.full((3, ), 0.15, dtype=torch.float64),
                   torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))


def _high_dim(dim: int = 16, num_modes: int = 8, std: float = 0.3) -> Mixture:
    # means drawn once (fixed seed): N(0, I) in 16-D, pairwise distances ≈ √32 ≈ 5.7 ≫ std
    g = torch.Generator().manual_seed(1234)
    means = torch.randn(num_modes, dim, generator=g, dtype=torch.float64)
    return Mixture(f'gauss{dim}d', means, torch.full((num_modes, ), std, dtype=torch.float64),
                   torch.full((num_modes, ), 1.0 / num_modes, dtype=torch.float64))


MIXTURES = {'ring8': _ring, 'unbalanced3': _unbalanced, 'gauss16d': _high_dim}


def make_mixture(name: str) -> Mixture:
    if name not in MIXTURES:
        raise ValueError(f'benchmarks/toy: unknown mixture {name!r}; expected one of {sorted(MIXTURES)}')
    return MIXTURES[name]()


def mode_metrics(mixture: Mixture, x: torch.Tensor, coverage_share: float = 0.25,
                 quantile: float = 0.999) -> Dict[str, float]:
    """Mode statistics of samples ``x`` [n, d].

    Each sample is assigned to its most likely component (argmax_k π_k N(x; μ_k, s_k² I)); it is *on mode* if
    ‖x − μ_k‖²/s_k² ≤ the ``quantile`` of χ²_d (99.9 % of the mode's own samples are).

    - ``coverage``: fraction of modes k whose on-mode samples make up ≥ coverage_share·π_k of all samples;
    - ``weight_l1``: Σ_k |f_k − π_k|, f_k = fraction of samples assigned to k (0 = right weights, 2 = disjoint);
    - ``off_mode``: fraction of samples on no mode (blur between modes, outliers).
    """
    x = x.double()
    sq = (x[:, None, :] - mixture.means).square().sum(-1)                      # [n, K]
    log_joint = mixture.weights.log() - mixture.dim * mixture.stds.log() - 0.5 * sq / mixture.stds.square()
    k = log_joint.argmax(1)
    on_mode = (sq.gather(1, k[:, None])[:, 0] / mixture.stds[k].square()) <= chi2.ppf(quantile, mixture.dim)
    n, K = x.shape[0], mixture.num_modes
    freq = torch.bincount(k, minlength=K).double() / n
    on_freq = torch.bincount(k[on_mode], minlength=K).double() / n
    covered = on_freq >= coverage_share * mixture.weights
    return {'coverage': float(covered.double().mean()), 'weight_l1': float((freq - mixture.weights).abs().sum()),
            'off_mode': float(1.0 - on_mode.double().mean())}


def w2_exact(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W2 between two equal-size empirical measures (POT ``ot.emd2``, squared Euclidean cost)."""
    import ot  # POT: benchmark-only dependency
    a = x.double().numpy()
    b = y.double().numpy()
    cost = ot.dist(a, b, metric='sqeuclidean')
    w = np.full(a.shape[0], 1.0 / a.shape[0])
    v = np.full(b.shape[0], 1.0 / b.shape[0])
    return float(math.sqrt(max(ot.emd2(w, v, cost, numItermax=1_000_000), 0.0)))
